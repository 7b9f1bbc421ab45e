/*
 * The pump's observation log: entries proxy/_pump.c writes for observed pairs
 * and protocol/pumplog.py (observe_log) reads; LOG_HEAD there is this layout.
 *
 * An entry: a head of LOG_HEAD bytes (pair id int64, kind int32, length int32,
 * receive time in ns int64, native byte order), then length bytes. The kinds
 * have the same names in Python (proxy/connection.py, PUMP_LOG_*); a test
 * holds the two equal.
 */
#ifndef PGOTEL_PUMPLOG_H
#define PGOTEL_PUMPLOG_H

#define LOG_HEAD 24

enum {
    LOG_CLIENT = 0,  /* bytes the client sent (already forwarded) */
    LOG_SERVER = 1,  /* bytes the server sent (already forwarded) */
    LOG_HANDBACK = 2, /* the pair is handed back to the event loop */
    LOG_CLIENT_WAIT = 3 /* the pump read the server again after the client's socket was full: the
                           wait in ns (int64, native byte order); the head's time is its end */
};

#endif
