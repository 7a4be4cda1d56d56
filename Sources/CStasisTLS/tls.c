// TLS 1.3 over a connected socket, through OpenSSL: contexts, the handshake with certificate pinning, reads
// and writes, and self-signed identities. Every cryptographic operation is OpenSSL's.
#define _GNU_SOURCE
#include "CStasisTLS.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <sys/socket.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

struct stasis_tls_context {
    SSL_CTX *ctx;
    int server;
    uint8_t *pins;
    size_t pin_count;
    int has_ca;
    // A web client: OpenSSL's own chain verification, the host sent as SNI and checked as a name or address.
    int web;
};

struct stasis_tls_session {
    SSL *ssl;
    stasis_tls_context *context;
    // Why the verify callback refused the peer's certificate, for the handshake's error.
    char refusal[256];
};

static int session_index = -1;
static BIO_METHOD *socket_method;
static pthread_once_t once = PTHREAD_ONCE_INIT;

// OpenSSL's own socket BIO writes with write(2): a peer gone raises SIGPIPE, which would kill stasis. This one
// sends with MSG_NOSIGNAL; the descriptor stays the caller's.
static int socket_write(BIO *bio, const char *data, size_t length, size_t *written) {
    int fd = (int)(intptr_t)BIO_get_data(bio);
    for (;;) {
        ssize_t n = send(fd, data, length, MSG_NOSIGNAL);
        if (n >= 0) { *written = (size_t)n; return 1; }
        if (errno != EINTR) return 0;
    }
}

static int socket_read(BIO *bio, char *data, size_t length, size_t *got) {
    int fd = (int)(intptr_t)BIO_get_data(bio);
    for (;;) {
        ssize_t n = recv(fd, data, length, 0);
        if (n > 0) { *got = (size_t)n; return 1; }
        if (n == 0) { *got = 0; errno = 0; return 0; }
        if (errno != EINTR) return 0;
    }
}

static long socket_control(BIO *bio, int command, long number, void *pointer) {
    (void)bio; (void)number; (void)pointer;
    return command == BIO_CTRL_FLUSH ? 1 : 0;
}

static int socket_create(BIO *bio) {
    BIO_set_init(bio, 1);
    return 1;
}

static void initialize(void) {
    session_index = SSL_get_ex_new_index(0, NULL, NULL, NULL, NULL);
    socket_method = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "stasis socket");
    BIO_meth_set_write_ex(socket_method, socket_write);
    BIO_meth_set_read_ex(socket_method, socket_read);
    BIO_meth_set_ctrl(socket_method, socket_control);
    BIO_meth_set_create(socket_method, socket_create);
}

// "what: OpenSSL's reason" from the error queue (its last entry says most), then clears the queue.
static void put_error(char *error, size_t size, const char *what) {
    unsigned long code = ERR_peek_last_error();
    char reason[256] = "";
    if (code) ERR_error_string_n(code, reason, sizeof reason);
    ERR_clear_error();
    snprintf(error, size, "%s%s%s", what, reason[0] ? ": " : "", reason);
}

static void hex(const uint8_t *bytes, size_t count, char *out) {
    for (size_t i = 0; i < count; i++) sprintf(out + 2 * i, "%02x", bytes[i]);
}

static int certificate_digest(X509 *certificate, uint8_t out[32]) {
    unsigned int length = 0;
    return X509_digest(certificate, EVP_sha256(), out, &length) == 1 && length == 32 ? 0 : -1;
}

// The peer's certificate is accepted when pinned (and within its dates), or, with a CA, when OpenSSL's chain
// verification passed. Called for each certificate of the peer's chain, the leaf (depth 0) last.
static int verify_peer(int verified, X509_STORE_CTX *store) {
    SSL *ssl = X509_STORE_CTX_get_ex_data(store, SSL_get_ex_data_X509_STORE_CTX_idx());
    stasis_tls_session *session = ssl ? SSL_get_ex_data(ssl, session_index) : NULL;
    if (!session) return 0;
    stasis_tls_context *context = session->context;
    int depth = X509_STORE_CTX_get_error_depth(store);
    X509 *certificate = X509_STORE_CTX_get_current_cert(store);
    if (context->pin_count > 0 && depth > 0 && !context->has_ca) return 1; // the leaf's pin decides
    if (context->pin_count > 0 && depth == 0 && certificate) {
        if (X509_cmp_current_time(X509_get0_notAfter(certificate)) <= 0) {
            snprintf(session->refusal, sizeof session->refusal, "its certificate has expired");
            return 0;
        }
        if (X509_cmp_current_time(X509_get0_notBefore(certificate)) >= 0) {
            snprintf(session->refusal, sizeof session->refusal, "its certificate is not valid yet");
            return 0;
        }
        uint8_t digest[32];
        if (certificate_digest(certificate, digest) == 0) {
            for (size_t i = 0; i < context->pin_count; i++) {
                if (CRYPTO_memcmp(digest, context->pins + 32 * i, 32) == 0) return 1;
            }
            char text[65];
            hex(digest, 32, text);
            snprintf(session->refusal, sizeof session->refusal, "its certificate (sha256:%s) is not one of the pinned ones", text);
        }
        if (!context->has_ca) return 0;
    }
    if (!verified && !session->refusal[0]) {
        snprintf(session->refusal, sizeof session->refusal, "%s",
                 X509_verify_cert_error_string(X509_STORE_CTX_get_error(store)));
    }
    return verified;
}

// A context set up as far as `failed` says (NULL: all of it) into ours, or NULL with `error` when it failed
// (the SSL_CTX freed) or memory ran out.
static stasis_tls_context *wrap_context(SSL_CTX *ctx, const char *failed, char *error, size_t error_size) {
    if (failed) {
        put_error(error, error_size, failed);
        SSL_CTX_free(ctx);
        return NULL;
    }
    stasis_tls_context *context = calloc(1, sizeof *context);
    if (!context) { SSL_CTX_free(ctx); snprintf(error, error_size, "out of memory"); return NULL; }
    context->ctx = ctx;
    return context;
}

stasis_tls_context *stasis_tls_context_new(int server, const char *certificate, const char *key,
                                           const uint8_t *pins, size_t pin_count, const char *ca_file,
                                           char *error, size_t error_size) {
    pthread_once(&once, initialize);
    SSL_CTX *ctx = SSL_CTX_new(server ? TLS_server_method() : TLS_client_method());
    if (!ctx) { put_error(error, error_size, "cannot make a TLS context"); return NULL; }
    char what[512];
    const char *failed = NULL;
    // AES-128-GCM first: as strong as a migration needs and the fastest where AES-NI is (the transfer
    // shares its cores with the dump and the restore).
    if (SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION) != 1
        || SSL_CTX_set_ciphersuites(ctx, "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256") != 1) {
        failed = "cannot require TLS 1.3";
    } else if (SSL_CTX_use_certificate_chain_file(ctx, certificate) != 1) {
        snprintf(what, sizeof what, "cannot use the certificate %s", certificate);
        failed = what;
    } else if (SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1) {
        snprintf(what, sizeof what, "cannot use the key %s", key);
        failed = what;
    } else if (SSL_CTX_check_private_key(ctx) != 1) {
        snprintf(what, sizeof what, "the key %s is not the certificate %s's", key, certificate);
        failed = what;
    } else if (ca_file && SSL_CTX_load_verify_locations(ctx, ca_file, NULL) != 1) {
        snprintf(what, sizeof what, "cannot use the CA certificates in %s", ca_file);
        failed = what;
    }
    // Both ends prove who they are; no session tickets (each migration is one connection).
    if (!failed) {
        SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, verify_peer);
        SSL_CTX_set_num_tickets(ctx, 0);
    }
    stasis_tls_context *context = wrap_context(ctx, failed, error, error_size);
    if (!context) return NULL;
    context->server = server;
    context->has_ca = ca_file != NULL;
    if (pin_count > 0) {
        context->pins = malloc(32 * pin_count);
        if (!context->pins) { stasis_tls_context_free(context); snprintf(error, error_size, "out of memory"); return NULL; }
        memcpy(context->pins, pins, 32 * pin_count);
        context->pin_count = pin_count;
    }
    return context;
}

stasis_tls_context *stasis_tls_web_context_new(const char *ca_file, char *error, size_t error_size) {
    pthread_once(&once, initialize);
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    if (!ctx) { put_error(error, error_size, "cannot make a TLS context"); return NULL; }
    char what[512];
    const char *failed = NULL;
    if (SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION) != 1) {
        failed = "cannot require TLS 1.2";
    } else if (SSL_CTX_set_default_verify_paths(ctx) != 1) {
        failed = "cannot load the system's CA certificates";
    } else if (ca_file && SSL_CTX_load_verify_locations(ctx, ca_file, NULL) != 1) {
        snprintf(what, sizeof what, "cannot use the CA certificates in %s", ca_file);
        failed = what;
    }
    if (!failed) SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
    stasis_tls_context *context = wrap_context(ctx, failed, error, error_size);
    if (!context) return NULL;
    context->has_ca = 1;
    context->web = 1;
    return context;
}

void stasis_tls_context_free(stasis_tls_context *context) {
    if (!context) return;
    SSL_CTX_free(context->ctx);
    free(context->pins);
    free(context);
}

stasis_tls_session *stasis_tls_handshake(stasis_tls_context *context, int fd, const char *host, char *error, size_t error_size) {
    stasis_tls_session *session = calloc(1, sizeof *session);
    SSL *ssl = session ? SSL_new(context->ctx) : NULL;
    BIO *bio = ssl ? BIO_new(socket_method) : NULL;
    if (!bio) {
        put_error(error, error_size, "cannot start TLS");
        if (ssl) SSL_free(ssl);
        free(session);
        return NULL;
    }
    BIO_set_data(bio, (void *)(intptr_t)fd);
    SSL_set_bio(ssl, bio, bio);
    session->ssl = ssl;
    session->context = context;
    SSL_set_ex_data(ssl, session_index, session);
    if (host && context->web) {
        // An address is checked against the certificate's IP entries, a name against its DNS names (and sent
        // as SNI, which addresses are not).
        unsigned char address[16];
        int numeric = inet_pton(AF_INET, host, address) == 1 || inet_pton(AF_INET6, host, address) == 1;
        if (numeric) {
            X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl), host);
        } else {
            SSL_set_tlsext_host_name(ssl, host);
            SSL_set1_host(ssl, host);
        }
    } else if (host && context->has_ca && !context->server) {
        SSL_set1_host(ssl, host);
    }
    ERR_clear_error();
    errno = 0;
    int result = context->server ? SSL_accept(ssl) : SSL_connect(ssl);
    if (result == 1) return session;
    int saved = errno;
    int kind = SSL_get_error(ssl, result);
    long verdict = SSL_get_verify_result(ssl);
    if (context->web && verdict != X509_V_OK) {
        ERR_clear_error();
        snprintf(error, error_size, "the server's certificate is refused: %s", X509_verify_cert_error_string(verdict));
    } else if (session->refusal[0]) {
        ERR_clear_error();
        snprintf(error, error_size, "the peer's certificate is refused: %s", session->refusal);
    } else if (kind == SSL_ERROR_SYSCALL && (saved == EAGAIN || saved == EWOULDBLOCK)) {
        ERR_clear_error();
        snprintf(error, error_size, "no TLS handshake within the time limit");
    } else if (kind == SSL_ERROR_SYSCALL || ERR_GET_REASON(ERR_peek_last_error()) == SSL_R_UNEXPECTED_EOF_WHILE_READING) {
        ERR_clear_error();
        snprintf(error, error_size, "the peer closed the connection during the TLS handshake%s%s",
                 saved ? ": " : "", saved ? strerror(saved) : "");
    } else {
        put_error(error, error_size, "the TLS handshake failed");
    }
    stasis_tls_session_free(session);
    return NULL;
}

void stasis_tls_session_free(stasis_tls_session *session) {
    if (!session) return;
    SSL_free(session->ssl);
    free(session);
}

int stasis_tls_peer_fingerprint(stasis_tls_session *session, uint8_t out[32]) {
    X509 *certificate = SSL_get0_peer_certificate(session->ssl);
    return certificate ? certificate_digest(certificate, out) : -1;
}

const char *stasis_tls_version(stasis_tls_session *session) { return SSL_get_version(session->ssl); }
const char *stasis_tls_cipher(stasis_tls_session *session) { return SSL_get_cipher_name(session->ssl); }

// What a failed SSL_read_ex or SSL_write_ex means.
static int classify(stasis_tls_session *session, int result, int saved, char *error, size_t error_size) {
    int kind = SSL_get_error(session->ssl, result);
    if (kind == SSL_ERROR_ZERO_RETURN) return STASIS_TLS_CLOSED;
    if (kind == SSL_ERROR_SYSCALL) {
        ERR_clear_error();
        if (saved == EAGAIN || saved == EWOULDBLOCK) return STASIS_TLS_TIMED_OUT;
        if (saved == 0 || saved == EPIPE || saved == ECONNRESET) return STASIS_TLS_CLOSED;
        snprintf(error, error_size, "%s", strerror(saved));
        errno = saved;
        return STASIS_TLS_FAILED;
    }
    if (ERR_GET_REASON(ERR_peek_last_error()) == SSL_R_UNEXPECTED_EOF_WHILE_READING) {
        ERR_clear_error();
        return STASIS_TLS_CLOSED;
    }
    put_error(error, error_size, "TLS");
    return STASIS_TLS_FAILED;
}

long stasis_tls_read(stasis_tls_session *session, void *buffer, size_t size, char *error, size_t error_size) {
    size_t got = 0;
    ERR_clear_error();
    errno = 0;
    int result = SSL_read_ex(session->ssl, buffer, size, &got);
    if (result == 1) return (long)got;
    return classify(session, result, errno, error, error_size);
}

int stasis_tls_write(stasis_tls_session *session, const void *buffer, size_t size, char *error, size_t error_size) {
    size_t done = 0;
    while (done < size) {
        size_t written = 0;
        ERR_clear_error();
        errno = 0;
        int result = SSL_write_ex(session->ssl, (const char *)buffer + done, size - done, &written);
        if (result != 1) return classify(session, result, errno, error, error_size);
        done += written;
    }
    return 0;
}

static int add_extension(X509 *certificate, int nid, const char *value) {
    X509V3_CTX v3;
    X509V3_set_ctx_nodb(&v3);
    X509V3_set_ctx(&v3, certificate, certificate, NULL, NULL, 0);
    X509_EXTENSION *extension = X509V3_EXT_conf_nid(NULL, &v3, nid, value);
    if (!extension) return 0;
    int added = X509_add_ext(certificate, extension, -1);
    X509_EXTENSION_free(extension);
    return added;
}

// Writes with `write` into a new file (never an existing one) of `mode`, synced.
static int write_new_file(const char *path, int mode, int (*write)(FILE *, void *), void *object) {
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode);
    if (fd < 0) return -1;
    FILE *file = fdopen(fd, "w");
    if (!file) { close(fd); unlink(path); return -1; }
    int ok = write(file, object) == 1 && fflush(file) == 0 && fsync(fd) == 0;
    if (fclose(file) != 0) ok = 0;
    if (!ok) { unlink(path); return -1; }
    return 0;
}

static int write_key(FILE *file, void *key) { return PEM_write_PrivateKey(file, key, NULL, NULL, 0, NULL, NULL); }
static int write_certificate(FILE *file, void *certificate) { return PEM_write_X509(file, certificate); }

int stasis_tls_generate(const char *certificate_path, const char *key_path, const char *common_name,
                        long not_before, long not_after, char *error, size_t error_size) {
    EVP_PKEY *key = EVP_EC_gen("P-256");
    X509 *certificate = key ? X509_new() : NULL;
    uint8_t serial[16];
    BIGNUM *number = NULL;
    int ok = certificate && RAND_bytes(serial, sizeof serial) == 1;
    if (ok) {
        serial[0] &= 0x7f; // positive
        number = BN_bin2bn(serial, sizeof serial, NULL);
        X509_NAME *name = X509_get_subject_name(certificate);
        char alternative[300];
        snprintf(alternative, sizeof alternative, "DNS:%s", common_name);
        ok = number && BN_to_ASN1_INTEGER(number, X509_get_serialNumber(certificate))
            && X509_set_version(certificate, X509_VERSION_3)
            && X509_gmtime_adj(X509_getm_notBefore(certificate), not_before)
            && X509_gmtime_adj(X509_getm_notAfter(certificate), not_after)
            && X509_set_pubkey(certificate, key)
            && X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_UTF8, (const unsigned char *)common_name, -1, -1, 0)
            && X509_set_issuer_name(certificate, name)
            && add_extension(certificate, NID_basic_constraints, "critical,CA:FALSE")
            && add_extension(certificate, NID_key_usage, "critical,digitalSignature")
            && add_extension(certificate, NID_ext_key_usage, "serverAuth,clientAuth")
            && add_extension(certificate, NID_subject_alt_name, alternative)
            && X509_sign(certificate, key, EVP_sha256()) > 0;
    }
    int result = -1;
    if (!ok) {
        put_error(error, error_size, "cannot make a key and certificate");
    } else if (write_new_file(key_path, 0600, write_key, key) != 0) {
        snprintf(error, error_size, "cannot create %s: %s", key_path, strerror(errno));
    } else if (write_new_file(certificate_path, 0644, write_certificate, certificate) != 0) {
        snprintf(error, error_size, "cannot create %s: %s", certificate_path, strerror(errno));
        unlink(key_path);
    } else {
        result = 0;
    }
    BN_free(number);
    X509_free(certificate);
    EVP_PKEY_free(key);
    return result;
}

int stasis_tls_file_fingerprint(const char *certificate_path, uint8_t out[32], char *error, size_t error_size) {
    FILE *file = fopen(certificate_path, "re");
    if (!file) {
        snprintf(error, error_size, "cannot open %s: %s", certificate_path, strerror(errno));
        return -1;
    }
    X509 *certificate = PEM_read_X509(file, NULL, NULL, NULL);
    fclose(file);
    if (!certificate) {
        char what[512];
        snprintf(what, sizeof what, "%s holds no PEM certificate", certificate_path);
        put_error(error, error_size, what);
        return -1;
    }
    int result = certificate_digest(certificate, out);
    X509_free(certificate);
    if (result != 0) snprintf(error, error_size, "cannot hash the certificate in %s", certificate_path);
    return result;
}
