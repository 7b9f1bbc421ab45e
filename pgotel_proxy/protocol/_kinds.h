/*
 * Message kinds: the type byte of every message after start-up, named per
 * direction as in the "Message Formats" chapter of the PostgreSQL
 * documentation. FE_ for frontend (F) messages, BE_ for backend (B) ones: the
 * same byte means different messages in the two directions.
 *
 * The Python names are in pgotel_proxy/protocol/kinds.py (FRONTEND_PARSE is
 * FE_PARSE here, BACKEND_DATA_ROW is BE_DATA_ROW); tests/test_kinds.py holds
 * the two lists equal.
 */
#ifndef PGOTEL_KINDS_H
#define PGOTEL_KINDS_H

/* Frontend (F) */
#define FE_BIND 'B'
#define FE_CLOSE 'C'
#define FE_COPY_DATA 'd'
#define FE_COPY_DONE 'c'
#define FE_COPY_FAIL 'f'
#define FE_DESCRIBE 'D'
#define FE_EXECUTE 'E'
#define FE_FLUSH 'H'
#define FE_FUNCTION_CALL 'F'
#define FE_PARSE 'P'
#define FE_PASSWORD 'p'
#define FE_QUERY 'Q'
#define FE_SYNC 'S'
#define FE_TERMINATE 'X'

/* Backend (B) */
#define BE_PARSE_COMPLETE '1'
#define BE_BIND_COMPLETE '2'
#define BE_CLOSE_COMPLETE '3'
#define BE_NOTIFICATION_RESPONSE 'A'
#define BE_COPY_DONE 'c'
#define BE_COMMAND_COMPLETE 'C'
#define BE_COPY_DATA 'd'
#define BE_DATA_ROW 'D'
#define BE_ERROR_RESPONSE 'E'
#define BE_COPY_IN_RESPONSE 'G'
#define BE_COPY_OUT_RESPONSE 'H'
#define BE_EMPTY_QUERY_RESPONSE 'I'
#define BE_BACKEND_KEY_DATA 'K'
#define BE_NO_DATA 'n'
#define BE_NOTICE_RESPONSE 'N'
#define BE_AUTHENTICATION 'R'
#define BE_PORTAL_SUSPENDED 's'
#define BE_PARAMETER_STATUS 'S'
#define BE_PARAMETER_DESCRIPTION 't'
#define BE_ROW_DESCRIPTION 'T'
#define BE_NEGOTIATE_PROTOCOL_VERSION 'v'
#define BE_FUNCTION_CALL_RESPONSE 'V'
#define BE_COPY_BOTH_RESPONSE 'W'
#define BE_READY_FOR_QUERY 'Z'

#endif
