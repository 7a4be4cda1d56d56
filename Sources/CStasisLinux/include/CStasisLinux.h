// Linux calls that Swift's Glibc module does not expose (they need _GNU_SOURCE).
#ifndef C_STASIS_LINUX_H
#define C_STASIS_LINUX_H

#include <stdint.h>

/// Frees the blocks of [offset, offset + length) of fd, keeping the file's size: fallocate(2) with
/// FALLOC_FL_PUNCH_HOLE. Returns 0, or -1 with errno set.
int stasis_punch_hole(int fd, int64_t offset, int64_t length);

/// Starts the kernel's writeback of [offset, offset + length) of fd without waiting for it:
/// sync_file_range(2) with SYNC_FILE_RANGE_WRITE. Returns 0, or -1 with errno set.
int stasis_start_writeback(int fd, int64_t offset, int64_t length);

/// Flushes every dirty page of the filesystem holding fd and waits for it: syncfs(2).
int stasis_syncfs(int fd);

/// Makes this process the reaper of orphaned descendants (on = 1) or not (0): prctl(2) with
/// PR_SET_CHILD_SUBREAPER (prctl is variadic, which Swift cannot call). Returns 0, or -1 with errno set.
int stasis_set_child_subreaper(int on);

/// Hands [buffer, buffer + length) to the pipe fd without copying: vmsplice(2). The pages are referenced,
/// not copied, so the caller must never change them. Returns the bytes handed over, or -1 with errno set.
long stasis_vmsplice(int fd, const void *buffer, unsigned long length);

/// Copies `length` bytes from address `remote` of process `pid` into `local`: process_vm_readv(2). Returns the
/// bytes copied, or -1 with errno set.
long stasis_process_read(int pid, void *local, uint64_t remote, unsigned long length);

/// Copies `length` bytes from `local` to address `remote` of process `pid`: process_vm_writev(2).
long stasis_process_write(int pid, const void *local, uint64_t remote, unsigned long length);

/// 1 when `path` is on a filesystem held in memory (tmpfs, ramfs), 0 when not, -1 with errno set: statfs(2).
int stasis_is_in_memory(const char *path);

/// An anonymous memory file named `name`, close-on-exec: memfd_create(2). Returns its descriptor, or -1 with errno set.
int stasis_memfd(const char *name);

/// The PID of the process at the other end of the unix socket fd (SO_PEERCRED), or -1 with errno set.
int stasis_socket_peer_pid(int fd);

/// A unix stream socket (close-on-exec) created in the network namespace of process `pid`, so that it reaches
/// the abstract socket names there (a container's); made on a thread of its own that enters that namespace
/// (setns), the rest of this process staying where it is. -1 with errno set.
int stasis_unix_socket_in_netns_of(int pid);

/// Destroys (sock_diag SOCK_DESTROY) the TCP sockets in TIME_WAIT in this network namespace whose local end
/// is `address`:`port` (`address`: 4 bytes for AF_INET, 16 for AF_INET6, network order; all zeros matches
/// any address of that family). A TIME_WAIT left by a connection its listener's side closed first keeps a
/// new listener off that port, SO_REUSEADDR or not, for a minute. Returns how many were destroyed, or -errno.
int stasis_destroy_time_wait(int family, const uint8_t *address, uint16_t port);

/// pipe2(O_CLOEXEC) and accept4(SOCK_CLOEXEC): a descriptor that is close-on-exec from its first instant, so
/// that no child started meanwhile by another thread inherits it. Glibc declares both only under _GNU_SOURCE.
int stasis_pipe_cloexec(int ends[2]);
int stasis_accept_cloexec(int listener);
/// 1 when the file's first bytes are in the page cache (a read of them would not wait: preadv2 with
/// RWF_NOWAIT), 0 when they are not, -1 when that cannot be told.
int stasis_start_is_cached(int fd);
/// posix_spawn_file_actions_addclosefrom_np (glibc >= 2.34; Swift's Glibc module does not declare it).
/// `actions` is a posix_spawn_file_actions_t.
int stasis_spawn_close_from(void *actions, int lowest);

/// kcmp(2) KCMP_FILE: 0 when descriptor `fd1` of process `pid1` and `fd2` of `pid2` are the same open file,
/// 1 or 2 when they differ (ordering), -1 with errno set when it cannot be told (a process or descriptor gone).
int stasis_same_file(int pid1, int fd1, int pid2, int fd2);

/// SIGINT, SIGTERM and SIGHUP while an operation must settle before stasis stops (interruption.c). After
/// `install`, the state decides what a signal does: idle, the process exits at once (128 + the signal);
/// armed with a connection, the first signal is recorded and the connection shut down, so the operation
/// fails where it stands and undoes what it did; deferring, the signal is only recorded. `defer` returns the
/// signal recorded so far (0: none), read after the switch, so a signal is either seen there or deferred.
int stasis_interruption_install(void);
void stasis_interruption_idle(void);
void stasis_interruption_arm(int fd);
int stasis_interruption_defer(void);
int stasis_interruption_caught(void);

#endif
