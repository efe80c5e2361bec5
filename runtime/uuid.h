/*
 * uuid.h: new event and command ids.
 *
 * Ids are UUID version 7 (RFC 9562): 48 bits of Unix milliseconds, then
 * random bits. Time-ordered ids keep the store's id index append-mostly,
 * which matters for insert speed on long-lived stores.
 */
#ifndef EBB_UUID_H
#define EBB_UUID_H

#define EBB_UUID_LEN 36 /* characters, without the NUL */

/* Writes a new id and a NUL into out (at least EBB_UUID_LEN + 1 bytes). Thread-safe. */
void ebb_uuid_new(char out[EBB_UUID_LEN + 1]);

#endif
