/*
 * nats_read.c: ebb-nats-read, the NATS specs' independent reader of a
 * JetStream stream (linked with libnats, nothing of ebb's).
 *
 *   ebb-nats-read [TLS] URL STREAM      every message, one JSON line each:
 *       {"seq":N,"subject":"...","headers":{"Name":"value",...},"data":BODY}
 *       (BODY as stored: ebb's messages are JSON)
 *   ebb-nats-read URL STREAM --info     {"messages":N,"first_seq":N,"last_seq":N}
 *   ebb-nats-read URL STREAM --create SUBJECT   creates the stream with that one subject
 *
 * TLS (before the URL): --tls-ca FILE (trust these CA certificates),
 * --tls-cert FILE --tls-key FILE (a client certificate). A token or a user
 * and password go in the URL (nats://TOKEN@host:port).
 *
 * Exit status 0, or 1 with the reason on stderr.
 */
#include <nats/nats.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void put_string(const char *s, int n) {
  putchar('"');
  for (int i = 0; i < n; i++) {
    unsigned char c = (unsigned char)s[i];
    if (c == '"' || c == '\\') printf("\\%c", c);
    else if (c < 0x20) printf("\\u%04x", c);
    else putchar(c);
  }
  putchar('"');
}

static int die(const char *what, natsStatus s, jsErrCode je) {
  fprintf(stderr, "ebb-nats-read: %s: %s (%d) %s\n", what, natsStatus_GetText(s), (int)je,
          nats_GetLastError(NULL) ? nats_GetLastError(NULL) : "");
  return 1;
}

int main(int argc, char **argv) {
  const char *ca = NULL, *cert = NULL, *key = NULL, *creds = NULL;
  while (argc >= 3 && strncmp(argv[1], "--", 2) == 0) {
    if (strcmp(argv[1], "--creds") == 0) creds = argv[2];
    else if (strcmp(argv[1], "--tls-ca") == 0) ca = argv[2];
    else if (strcmp(argv[1], "--tls-cert") == 0) cert = argv[2];
    else if (strcmp(argv[1], "--tls-key") == 0) key = argv[2];
    else break;
    argv += 2;
    argc -= 2;
  }
  if (argc < 3) {
    fprintf(stderr, "usage: ebb-nats-read [--creds FILE] [--tls-ca FILE] [--tls-cert FILE --tls-key FILE] URL "
                    "STREAM [--info | --create SUBJECT]\n");
    return 2;
  }
  natsConnection *nc = NULL;
  natsOptions *opts = NULL;
  jsCtx *js = NULL;
  jsErrCode je = 0;
  natsStatus s = natsOptions_Create(&opts);
  if (s == NATS_OK) s = natsOptions_SetURL(opts, argv[1]);
  if (s == NATS_OK && ca) s = natsOptions_LoadCATrustedCertificates(opts, ca);
  if (s == NATS_OK && cert) s = natsOptions_LoadCertificatesChain(opts, cert, key);
  if (s == NATS_OK && (ca || cert)) s = natsOptions_SetSecure(opts, true);
  if (s == NATS_OK && creds) s = natsOptions_SetUserCredentialsFromFiles(opts, creds, NULL);
  if (s != NATS_OK) return die("options", s, 0);
  if ((s = natsConnection_Connect(&nc, opts)) != NATS_OK) return die("connect", s, 0);
  natsOptions_Destroy(opts);
  if ((s = natsConnection_JetStream(&js, nc, NULL)) != NATS_OK) return die("jetstream", s, 0);
  if (argc >= 5 && strcmp(argv[3], "--create") == 0) {
    jsStreamConfig sc;
    jsStreamConfig_Init(&sc);
    const char *subjects[1] = {argv[4]};
    sc.Name = argv[2];
    sc.Subjects = subjects;
    sc.SubjectsLen = 1;
    sc.Storage = js_FileStorage;
    jsStreamInfo *si = NULL;
    if ((s = js_AddStream(&si, js, &sc, NULL, &je)) != NATS_OK) return die("create", s, je);
    jsStreamInfo_Destroy(si);
    return 0;
  }
  jsStreamInfo *si = NULL;
  if ((s = js_GetStreamInfo(&si, js, argv[2], NULL, &je)) != NATS_OK) return die("stream info", s, je);
  uint64_t first = si->State.FirstSeq, last = si->State.LastSeq;
  if (argc >= 4 && strcmp(argv[3], "--info") == 0) {
    printf("{\"messages\":%llu,\"first_seq\":%llu,\"last_seq\":%llu}\n",
           (unsigned long long)si->State.Msgs, (unsigned long long)first, (unsigned long long)last);
    jsStreamInfo_Destroy(si);
    return 0;
  }
  jsStreamInfo_Destroy(si);
  for (uint64_t seq = first; seq && seq <= last; seq++) {
    natsMsg *m = NULL;
    je = 0;
    s = js_GetMsg(&m, js, argv[2], seq, NULL, &je);
    if (s == NATS_NOT_FOUND || je == JSNoMessageFoundErr) continue; /* deleted */
    if (s != NATS_OK) return die("get", s, je);
    printf("{\"seq\":%llu,\"subject\":", (unsigned long long)seq);
    put_string(natsMsg_GetSubject(m), (int)strlen(natsMsg_GetSubject(m)));
    printf(",\"headers\":{");
    const char **keys = NULL;
    int nk = 0;
    if (natsMsgHeader_Keys(m, &keys, &nk) == NATS_OK) {
      for (int i = 0; i < nk; i++) {
        const char *v = NULL;
        natsMsgHeader_Get(m, keys[i], &v);
        if (i) putchar(',');
        put_string(keys[i], (int)strlen(keys[i]));
        putchar(':');
        put_string(v ? v : "", v ? (int)strlen(v) : 0);
      }
      free((void *)keys);
    }
    printf("},\"data\":");
    fwrite(natsMsg_GetData(m), 1, (size_t)natsMsg_GetDataLength(m), stdout);
    printf("}\n");
    natsMsg_Destroy(m);
  }
  jsCtx_Destroy(js);
  natsConnection_Destroy(nc);
  return 0;
}
