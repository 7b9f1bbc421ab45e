// A node-postgres application traced by OpenTelemetry JS's pg instrumentation,
// run by tests/test_node_writers.py against the proxy.
//
// Environment:
//   PGOTEL_NODE_PG_PORT    the proxy's port on 127.0.0.1 (user postgres, database postgres)
//   PGOTEL_NODE_OTLP_URL   the OTLP/HTTP traces URL its spans are exported to
//   PGOTEL_NODE_CHANNEL    "sqlcommenter" (addSqlCommenterCommentToQueries) or
//                          "application_name" (enableTraceContextPropagation)
//   PGOTEL_NODE_TABLE      optional: a table (id int, v text) the queries insert
//                          into instead of reading, one autocommit write each
//
// It runs a few simple and extended-protocol queries, each in a pg.query CLIENT
// span of the instrumentation, exports those spans, and prints one JSON line per
// query: its text, its result and the ids of its CLIENT span.
'use strict';

const { context, trace } = require('@opentelemetry/api');
const { AsyncLocalStorageContextManager } = require('@opentelemetry/context-async-hooks');
const { OTLPTraceExporter } = require('@opentelemetry/exporter-trace-otlp-proto');
const { registerInstrumentations } = require('@opentelemetry/instrumentation');
const { PgInstrumentation } = require('@opentelemetry/instrumentation-pg');
const { resourceFromAttributes } = require('@opentelemetry/resources');
const { SimpleSpanProcessor, TracerProvider } = require('@opentelemetry/sdk-trace');

const port = Number(process.env.PGOTEL_NODE_PG_PORT);
const url = process.env.PGOTEL_NODE_OTLP_URL;
const channel = process.env.PGOTEL_NODE_CHANNEL;
let lastQuerySpan = null; // the context of the instrumentation's latest pg.query span
if (!port || !url || !['sqlcommenter', 'application_name'].includes(channel)) {
  console.error('set PGOTEL_NODE_PG_PORT, PGOTEL_NODE_OTLP_URL and PGOTEL_NODE_CHANNEL');
  process.exit(2);
}

const provider = new TracerProvider({
  resource: resourceFromAttributes({ 'service.name': 'node-writer' }),
  spanProcessors: [new SimpleSpanProcessor({ exporter: new OTLPTraceExporter({ url }) })],
});
trace.setGlobalTracerProvider(provider);
context.setGlobalContextManager(new AsyncLocalStorageContextManager().enable());
registerInstrumentations({
  instrumentations: [new PgInstrumentation({
    ignoreConnectSpans: true,
    addSqlCommenterCommentToQueries: channel === 'sqlcommenter',
    enableTraceContextPropagation: channel === 'application_name',
    // Called with the pg.query span before the query is sent: its ids are what
    // the proxy's statement span must name as its parent.
    requestHook: (span) => { lastQuerySpan = span.spanContext(); },
  })],
});

// Required after the instrumentation is registered, so that it is patched.
const { Client } = require('pg');

// The queries: simple protocol (no parameters) and extended (parameters).
const table = process.env.PGOTEL_NODE_TABLE;
const QUERIES = table ? [
  { text: `INSERT INTO ${table} VALUES (1, 'simple')` },
  { text: `INSERT INTO ${table} VALUES ($1, 'extended')`, values: [2] },
] : [
  { text: 'SELECT 42 AS answer' },
  { text: 'SELECT $1::int AS n', values: [1] },
  { text: 'SELECT $1::int AS n', values: [2] },
];
if (channel === 'application_name') {
  // A named statement, prepared once and executed again without its Parse: its
  // context comes from the session. (The instrumentation adds no sqlcommenter
  // comment to a named statement, whose text would freeze a stale context.)
  const text = table ? `INSERT INTO ${table} VALUES ($1, 'named')` : 'SELECT $1::int + 100 AS n';
  QUERIES.push({ name: 'by-n', text, values: [3] }, { name: 'by-n', text, values: [4] });
}

async function main() {
  const client = new Client({
    host: '127.0.0.1', port, user: 'postgres', database: 'postgres', application_name: 'node-writer',
  });
  await client.connect();
  const tracer = trace.getTracer('node-writer');
  for (const query of QUERIES) {
    lastQuerySpan = null;
    const result = await tracer.startActiveSpan('handle request', async (request) => {
      try {
        return await client.query(query);
      } finally {
        request.end();
      }
    });
    console.log(JSON.stringify({
      text: query.text, name: query.name || null, rows: result.rows,
      trace_id: lastQuerySpan.traceId, span_id: lastQuerySpan.spanId,
    }));
  }
  await client.end();
  await provider.shutdown();
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
