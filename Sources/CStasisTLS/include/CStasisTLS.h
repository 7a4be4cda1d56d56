#ifndef CSTASIS_TLS_H
#define CSTASIS_TLS_H

#include <stddef.h>
#include <stdint.h>

/// TLS 1.3 for migrations, through OpenSSL (libssl 3): a thin layer, no cryptography of its own. Both ends
/// present a certificate; a peer is accepted when its certificate's SHA-256 is pinned (and it is within its
/// validity dates), or when it chains to a given CA. Errors are written into `error` (`error_size` bytes).

typedef struct stasis_tls_context stasis_tls_context;
typedef struct stasis_tls_session stasis_tls_session;

/// A context for one role (`server` 1: accepts, 0: connects), with our certificate chain and key (PEM
/// files), the pinned SHA-256 fingerprints of acceptable peers (`pin_count` times 32 bytes) and/or a CA file
/// (NULL: none). NULL on failure.
stasis_tls_context *stasis_tls_context_new(int server, const char *certificate, const char *key,
                                           const uint8_t *pins, size_t pin_count, const char *ca_file,
                                           char *error, size_t error_size);
void stasis_tls_context_free(stasis_tls_context *context);

/// A client context for servers on the web (an OCI registry): TLS 1.2 or newer, no certificate of ours, the
/// server's chain verified against the system's CAs and those in `ca_file` (NULL: none), and its name against
/// the host given to the handshake (which is also sent as SNI). NULL on failure.
stasis_tls_context *stasis_tls_web_context_new(const char *ca_file, char *error, size_t error_size);

/// The handshake over connected socket `fd` (blocking; its timeouts apply). `host`: for a client with a CA,
/// the name the peer's certificate must carry (NULL: not checked). NULL on failure, `error` saying why (the
/// peer's certificate refused, no TLS spoken, ...).
stasis_tls_session *stasis_tls_handshake(stasis_tls_context *context, int fd, const char *host, char *error, size_t error_size);
void stasis_tls_session_free(stasis_tls_session *session);

/// The SHA-256 of the peer's certificate (32 bytes into `out`); 0, or -1 when there is none.
int stasis_tls_peer_fingerprint(stasis_tls_session *session, uint8_t out[32]);
/// The protocol version agreed ("TLSv1.3") and cipher suite.
const char *stasis_tls_version(stasis_tls_session *session);
const char *stasis_tls_cipher(stasis_tls_session *session);

/// Results of read and write beside a byte count.
enum { STASIS_TLS_CLOSED = -1, STASIS_TLS_TIMED_OUT = -2, STASIS_TLS_FAILED = -3 };

/// Up to `size` bytes: the count (> 0), or one of the results above (errno kept for FAILED).
long stasis_tls_read(stasis_tls_session *session, void *buffer, size_t size, char *error, size_t error_size);
/// All `size` bytes: 0, or one of the results above.
int stasis_tls_write(stasis_tls_session *session, const void *buffer, size_t size, char *error, size_t error_size);

/// Makes a P-256 key (`key_path`, created 0600, never replaced) and a self-signed certificate for it
/// (`certificate_path`), valid from now + `not_before` to now + `not_after` seconds, named `common_name`.
int stasis_tls_generate(const char *certificate_path, const char *key_path, const char *common_name,
                        long not_before, long not_after, char *error, size_t error_size);
/// The SHA-256 of the first certificate in a PEM file; 0, or -1 with `error`.
int stasis_tls_file_fingerprint(const char *certificate_path, uint8_t out[32], char *error, size_t error_size);

#endif
