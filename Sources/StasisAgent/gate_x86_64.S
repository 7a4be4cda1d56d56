// The gate's trampolines (x86-64 System V). Each of GATE_SLOTS entries loads its index and jumps to
// gate_common, which counts the thread into the gate (waiting while it is closed), calls the real driver
// function with the caller's arguments, six in registers, xmm0-7, and up to sixteen on the stack (the
// driver's widest, cuTensorMapEncodeIm2colWide, takes sixteen in all), counts the thread out, and returns
// the driver's answer.
#if defined(__x86_64__)
#define GATE_SLOTS 4096
    .text
    .globl stasis_gate_trampolines
    .hidden stasis_gate_trampolines
    .p2align 4
stasis_gate_trampolines:
    .set slot, 0
    .rept GATE_SLOTS
    .p2align 4
    endbr64
    movl $slot, %r11d
    jmp stasis_gate_common
    .set slot, slot + 1
    .endr

    .p2align 4
    .type stasis_gate_common, @function
stasis_gate_common:
    .cfi_startproc
    pushq %rbp
    .cfi_def_cfa_offset 16
    .cfi_offset %rbp, -16
    movq %rsp, %rbp
    .cfi_def_cfa_register %rbp
    // Save area, 16-aligned: six argument registers, r11 (the slot), rax (vector count of a variadic
    // call), xmm0-7.
    subq $192, %rsp
    movq %rdi, 0(%rsp)
    movq %rsi, 8(%rsp)
    movq %rdx, 16(%rsp)
    movq %rcx, 24(%rsp)
    movq %r8, 32(%rsp)
    movq %r9, 40(%rsp)
    movq %r11, 48(%rsp)
    movq %rax, 56(%rsp)
    movaps %xmm0, 64(%rsp)
    movaps %xmm1, 80(%rsp)
    movaps %xmm2, 96(%rsp)
    movaps %xmm3, 112(%rsp)
    movaps %xmm4, 128(%rsp)
    movaps %xmm5, 144(%rsp)
    movaps %xmm6, 160(%rsp)
    movaps %xmm7, 176(%rsp)
    call stasis_gate_enter_hook
    // The caller's stack arguments, copied below the save area for the real call.
    subq $128, %rsp
    movq 16(%rbp), %r10
    movq %r10, 0(%rsp)
    movq 24(%rbp), %r10
    movq %r10, 8(%rsp)
    movq 32(%rbp), %r10
    movq %r10, 16(%rsp)
    movq 40(%rbp), %r10
    movq %r10, 24(%rsp)
    movq 48(%rbp), %r10
    movq %r10, 32(%rsp)
    movq 56(%rbp), %r10
    movq %r10, 40(%rsp)
    movq 64(%rbp), %r10
    movq %r10, 48(%rsp)
    movq 72(%rbp), %r10
    movq %r10, 56(%rsp)
    movq 80(%rbp), %r10
    movq %r10, 64(%rsp)
    movq 88(%rbp), %r10
    movq %r10, 72(%rsp)
    movq 96(%rbp), %r10
    movq %r10, 80(%rsp)
    movq 104(%rbp), %r10
    movq %r10, 88(%rsp)
    movq 112(%rbp), %r10
    movq %r10, 96(%rsp)
    movq 120(%rbp), %r10
    movq %r10, 104(%rsp)
    movq 128(%rbp), %r10
    movq %r10, 112(%rsp)
    movq 136(%rbp), %r10
    movq %r10, 120(%rsp)
    movq 128(%rsp), %rdi
    movq 136(%rsp), %rsi
    movq 144(%rsp), %rdx
    movq 152(%rsp), %rcx
    movq 160(%rsp), %r8
    movq 168(%rsp), %r9
    movq 176(%rsp), %r11
    movq 184(%rsp), %rax
    movaps 192(%rsp), %xmm0
    movaps 208(%rsp), %xmm1
    movaps 224(%rsp), %xmm2
    movaps 240(%rsp), %xmm3
    movaps 256(%rsp), %xmm4
    movaps 272(%rsp), %xmm5
    movaps 288(%rsp), %xmm6
    movaps 304(%rsp), %xmm7
    leaq stasis_gate_targets(%rip), %r10
    movq (%r10,%r11,8), %r10
    call *%r10
    addq $128, %rsp
    // The answer (rax, and rdx for a two-word one) survives the count-out.
    movq %rax, 0(%rsp)
    movq %rdx, 8(%rsp)
    call stasis_gate_leave_hook
    movq 0(%rsp), %rax
    movq 8(%rsp), %rdx
    leave
    .cfi_def_cfa %rsp, 8
    ret
    .cfi_endproc
    .size stasis_gate_common, .-stasis_gate_common
#endif
    .section .note.GNU-stack,"",@progbits
