// The exported dlsym. Only lookups of "cu..." names other than RTLD_NEXT ones go to stasis_dlsym_hook (which
// hands out the agent's entry points for libcuda's); every other lookup goes to libc's dlsym by a tail jump,
// so that libc still sees the original caller's return address (RTLD_NEXT means "after the caller's
// object", and RTLD_DEFAULT searches the caller's namespace).
#if defined(__x86_64__)
    .text
    .globl dlsym
    .type dlsym, @function
    .p2align 4
dlsym:
    .cfi_startproc
    endbr64
    cmpq $-1, %rdi
    je 2f
    testq %rsi, %rsi
    jz 2f
    cmpb $0x63, (%rsi)      // 'c'
    jne 2f
    cmpb $0x75, 1(%rsi)     // 'u'
    je stasis_dlsym_hook
2:
    movq stasis_libc_dlsym(%rip), %rax
    testq %rax, %rax
    jz 1f
    jmp *%rax
1:
    // Called before the agent's constructor ran: find libc's dlsym first.
    pushq %rdi
    .cfi_def_cfa_offset 16
    pushq %rsi
    .cfi_def_cfa_offset 24
    subq $8, %rsp
    .cfi_def_cfa_offset 32
    call stasis_find_libc_dlsym
    addq $8, %rsp
    .cfi_def_cfa_offset 24
    popq %rsi
    .cfi_def_cfa_offset 16
    popq %rdi
    .cfi_def_cfa_offset 8
    testq %rax, %rax
    jz 3f
    jmp *%rax
3:
    // No libc dlsym to be found: answer as a failed lookup.
    ret
    .cfi_endproc
    .size dlsym, .-dlsym
#endif
    .section .note.GNU-stack,"",@progbits
