-- STUDIO data set (benches/workload/studio.rs): the workflows, the plan of
-- the executions and the statements that insert one chunk of them, set
-- based, through every trigger and constraint of the schema. Statements are
-- separated by lines `-- @name`; `{n}`, `{lo}` and `{hi}` are replaced.
--
-- Executions and steps are inserted in their final states (the triggers
-- accept a completed, failed, skipped or running step, a pending step only
-- under an execution that is not final); the history the transitions would
-- have written (execution_events) is inserted alongside, in the triggers'
-- shape (from/to status, payload keys), with the times of the plan.

-- @setup
SET synchronous_commit = off;
SET temp_buffers = '1GB';
SET work_mem = '256MB';
SET maintenance_work_mem = '512MB';
-- A UUIDv7 (as the crate makes them) of time `ts`: 48 bits of Unix
-- milliseconds, version 7, the rest random (inlined: one SELECT, volatile).
CREATE FUNCTION pg_temp.studio_uuid7(ts timestamptz) RETURNS uuid LANGUAGE sql VOLATILE AS $$
  SELECT encode(set_byte(overlay(uuid_send(gen_random_uuid())
                                 PLACING substring(int8send(floor(extract(epoch FROM ts) * 1000)::int8) FROM 3)
                                 FROM 1 FOR 6),
                         6, (get_byte(uuid_send(gen_random_uuid()), 6) & 15) | 112), 'hex')::uuid
$$;
-- The nodes of the 5 workflows: edges only from one layer to the next, so
-- a step's unfinished upstream steps are all of its in-degree once its
-- layer is beyond the execution's progress.
CREATE TEMP TABLE studio_nodes (
  w int, node text, layer int, ord int, node_type text, downstream text[], indeg int,
  max_retries int, fail_error text, first_in_layer boolean);
INSERT INTO studio_nodes (w, node, layer, ord, node_type, downstream, indeg, max_retries) VALUES
  (0, 'validate-order',      0, 0, 'transform', '{reserve-stock,charge-card}', 0, 0),
  (0, 'reserve-stock',       1, 1, 'db',        '{create-shipment}', 1, 1),
  (0, 'charge-card',         1, 2, 'payments',  '{create-shipment}', 1, 2),
  (0, 'create-shipment',     2, 3, 'http',      '{send-confirmation,update-crm}', 2, 2),
  (0, 'send-confirmation',   3, 4, 'email',     '{}', 1, 2),
  (0, 'update-crm',          3, 5, 'http',      '{}', 1, 2),
  (1, 'fetch-invoices',      0, 0, 'http',      '{transform-invoices}', 0, 2),
  (1, 'transform-invoices',  1, 1, 'transform', '{store-invoices}', 1, 0),
  (1, 'store-invoices',      2, 2, 'db',        '{}', 1, 1),
  (2, 'create-account',      0, 0, 'db',        '{send-welcome,provision-workspace}', 0, 1),
  (2, 'send-welcome',        1, 1, 'email',     '{mark-active}', 1, 2),
  (2, 'provision-workspace', 1, 2, 'http',      '{mark-active}', 1, 2),
  (2, 'mark-active',         2, 3, 'db',        '{}', 2, 1),
  (3, 'query-metrics',       0, 0, 'db',        '{aggregate}', 0, 1),
  (3, 'aggregate',           1, 1, 'transform', '{render-pdf}', 1, 0),
  (3, 'render-pdf',          2, 2, 'transform', '{upload-report}', 1, 0),
  (3, 'upload-report',       3, 3, 'storage',   '{notify-team}', 1, 2),
  (3, 'notify-team',         4, 4, 'email',     '{}', 1, 2),
  (4, 'lookup-payment',      0, 0, 'db',        '{issue-refund}', 0, 1),
  (4, 'issue-refund',        1, 1, 'payments',  '{record-refund}', 1, 2),
  (4, 'record-refund',       2, 2, 'db',        '{notify-customer}', 1, 1),
  (4, 'notify-customer',     3, 3, 'email',     '{}', 1, 2);
UPDATE studio_nodes n SET
  fail_error = CASE n.node_type
      WHEN 'transform' THEN 'invalid input: amount must be positive'
      WHEN 'email' THEN 'SMTP 451 4.7.1: temporary failure, try again later'
      WHEN 'db' THEN 'could not serialize access due to concurrent update'
      WHEN 'payments' THEN 'card declined (insufficient_funds)'
      ELSE 'HTTP 503 from upstream: service unavailable' END,
  first_in_layer = n.ord = (SELECT min(m.ord) FROM studio_nodes m WHERE m.w = n.w AND m.layer = n.layer);
CREATE TEMP TABLE studio_workflows (w int, id uuid, name text, layers int, share float8);
INSERT INTO studio_workflows
SELECT v.w, pg_temp.studio_uuid7(statement_timestamp() - interval '90 days' + v.w * interval '1 day'),
       v.name, (SELECT max(layer) + 1 FROM studio_nodes n WHERE n.w = v.w), v.share
  FROM (VALUES (0, 'order-fulfilment', 0.35), (1, 'invoice-sync', 0.25), (2, 'user-onboarding', 0.15),
               (3, 'nightly-report', 0.05), (4, 'payment-refund', 0.20)) v(w, name, share);
-- One row per workflow at version 3 (executions older than 8 and 20 days ran
-- versions 2 and 1).
INSERT INTO workflows (id, name, description, nodes, edges, version, created_at, updated_at)
SELECT w.id, w.name, 'STUDIO benchmark workflow ' || w.name,
       (SELECT jsonb_agg(jsonb_build_object('id', n.node, 'type', n.node_type,
                                            'config', jsonb_build_object('timeoutMs', 30000)) ORDER BY n.ord)
          FROM studio_nodes n WHERE n.w = w.w),
       (SELECT coalesce(jsonb_agg(jsonb_build_object('source', n.node, 'target', t.node) ORDER BY n.ord, t.node), '[]')
          FROM studio_nodes n CROSS JOIN LATERAL unnest(n.downstream) AS t(node) WHERE n.w = w.w),
       3, statement_timestamp() - interval '90 days', statement_timestamp() - interval '8 days'
  FROM studio_workflows w;

-- @plan
-- Every execution: workflow, status, user, times, progress (p: the layer
-- it failed, was cancelled or paused at, or is running), numbered in time
-- order so that chunks insert in the order a live system would.
CREATE TEMP TABLE studio_plan AS
WITH r AS (
  SELECT random() AS rs, random() AS rw, random() AS ru, random() AS rt, random() AS rl,
         random() AS rd, random() AS rr
    FROM generate_series(1, {n})
), s AS (
  SELECT CASE WHEN rw < 0.35 THEN 0 WHEN rw < 0.60 THEN 1 WHEN rw < 0.75 THEN 2
              WHEN rw < 0.80 THEN 3 ELSE 4 END AS wf,
         CASE WHEN rs < 0.90 THEN 'completed' WHEN rs < 0.95 THEN 'failed'
              WHEN rs < 0.97 THEN 'cancelled' WHEN rs < 0.985 THEN 'running'
              WHEN rs < 0.995 THEN 'paused' ELSE 'pending' END::execution_status AS status,
         -- 1,000 users, skewed (user-0 about 3%), 10% without a user.
         CASE WHEN ru < 0.1 THEN NULL
              ELSE 'user-' || floor(1000 * ((ru - 0.1) / 0.9) ^ 2)::int END AS user_id,
         rt, rl, rd, rr
    FROM r
), t AS (
  SELECT s.wf, s.status, s.user_id, w.id AS workflow_id, w.layers,
         statement_timestamp() - CASE s.status
             WHEN 'running' THEN interval '1 minute' + s.rt * interval '10 minutes'
             WHEN 'paused' THEN interval '1 minute' + s.rt * interval '3 days'
             WHEN 'pending' THEN s.rt * interval '2 minutes'
             ELSE interval '2 minutes' + s.rt * interval '30 days' END AS started_at,
         (0.5 + 4.5 * s.rd) * interval '1 second' AS d,
         CASE s.status WHEN 'completed' THEN w.layers WHEN 'pending' THEN 0
                       ELSE floor(s.rl * w.layers)::int END AS p,
         -- running: its layer p is running (else ready, waiting for a worker);
         -- 1% of those hold a lease that expired (a crashed worker).
         s.rr < 0.6 AS run_now, s.rr < 0.006 AS expired
    FROM s JOIN studio_workflows w ON w.w = s.wf
)
SELECT row_number() OVER (ORDER BY t.started_at) AS n, t.*,
       pg_temp.studio_uuid7(t.started_at) AS id,
       CASE t.status
           WHEN 'completed' THEN t.started_at + t.layers * t.d + interval '100 ms'
           WHEN 'failed' THEN t.started_at + (t.p + 1) * t.d + interval '100 ms'
           WHEN 'cancelled' THEN t.started_at + t.p * t.d + interval '500 ms' END AS completed_at,
       CASE WHEN t.status = 'failed' THEN
           (SELECT format('step %s failed: %s', n.node, n.fail_error) FROM studio_nodes n
             WHERE n.w = t.wf AND n.layer = t.p AND n.first_in_layer) END AS error,
       CASE WHEN t.started_at < statement_timestamp() - interval '20 days' THEN 1
            WHEN t.started_at < statement_timestamp() - interval '8 days' THEN 2 ELSE 3 END AS version
  FROM t;
CREATE INDEX ON studio_plan (n);
ANALYZE studio_plan;
CREATE TEMP TABLE studio_steps (LIKE studio_nodes);
ALTER TABLE studio_steps ADD n int8, ADD execution_id uuid, ADD x_status execution_status,
  ADD es timestamptz, ADD d interval, ADD p int, ADD expired boolean, ADD x_completed_at timestamptz,
  ADD status step_status, ADD id uuid, ADD retry_count int, ADD started_at timestamptz,
  ADD completed_at timestamptz, ADD worker text;

-- @chunk_steps
TRUNCATE studio_steps;
INSERT INTO studio_steps
SELECT n.*, p.n, p.id, p.status, p.started_at, p.d, p.p, p.expired, p.completed_at, x.status,
       pg_temp.studio_uuid7(p.started_at),
       CASE WHEN x.status = 'failed' THEN n.max_retries ELSE 0 END,
       CASE WHEN x.status IN ('completed', 'running') THEN p.started_at + n.layer * p.d + interval '50 ms'
            -- a failed step's last attempt
            WHEN x.status = 'failed' THEN p.started_at + n.layer * p.d
                 + n.max_retries * p.d / (n.max_retries + 1) + interval '50 ms' END,
       CASE WHEN x.status IN ('completed', 'failed') THEN p.started_at + (n.layer + 1) * p.d
            WHEN x.status = 'skipped' THEN p.completed_at END,
       'worker-' || (p.n % 16)
  FROM studio_plan p
       JOIN studio_nodes n ON n.w = p.wf
       CROSS JOIN LATERAL (SELECT CASE
           WHEN p.status = 'completed' THEN 'completed'
           WHEN p.status = 'pending' THEN 'pending'
           WHEN n.layer < p.p THEN 'completed'
           WHEN p.status = 'failed' THEN CASE WHEN n.layer > p.p THEN 'skipped'
                                              WHEN n.first_in_layer THEN 'failed' ELSE 'completed' END
           WHEN p.status = 'cancelled' THEN 'skipped'
           WHEN p.status = 'running' AND n.layer = p.p AND p.run_now THEN 'running'
           ELSE 'pending' END::step_status AS status) x
 WHERE p.n BETWEEN {lo} AND {hi};

-- @chunk_executions
INSERT INTO executions (id, workflow_id, status, user_id, data, error, started_at, completed_at,
                        created_at, updated_at, workflow_version)
SELECT p.id, p.workflow_id, p.status, p.user_id,
       jsonb_build_object(
           'trigger', 'api', 'requestId', 'req-' || p.n,
           'input', jsonb_build_object('orderId', 'ord-' || p.n, 'amount', (p.n % 50000) / 100.0,
                                       'currency', 'EUR',
                                       'customer', jsonb_build_object('id', 'cus-' || (p.n % 7919),
                                                                      'email', 'user' || p.n || '@example.com')),
           'tags', jsonb_build_array('studio', 'bench'), 'priority', 3),
       p.error, p.started_at, p.completed_at, p.started_at,
       coalesce(p.completed_at, p.started_at + p.p * p.d + interval '10 ms'), p.version
  FROM studio_plan p
 WHERE p.n BETWEEN {lo} AND {hi}
 ORDER BY p.n;

-- @chunk_insert_steps
INSERT INTO execution_steps (id, execution_id, node_id, status, input, output, retry_count, error,
                             started_at, completed_at, created_at, updated_at, upstream_pending,
                             downstream, max_retries, run_after, locked_by, locked_until, parked,
                             attempt, node_type)
SELECT s.id, s.execution_id, s.node, s.status,
       jsonb_build_object('nodeId', s.node, 'orderId', 'ord-' || s.n,
                          'params', jsonb_build_object('url', 'https://api.example.com/v1/' || s.node,
                                                       'method', 'POST', 'retries', s.max_retries)),
       CASE WHEN s.status = 'completed' THEN
           jsonb_build_object('ok', true, 'statusCode', 200,
                              'result', jsonb_build_object('id', 'res-' || s.n || '-' || s.ord,
                                                           'items', 12, 'message', 'done'),
                              'durationMs', (extract(epoch FROM s.d) * 1000)::int) END,
       s.retry_count,
       CASE WHEN s.status = 'failed' THEN s.fail_error END,
       s.started_at, s.completed_at, s.es, coalesce(s.completed_at, s.started_at, s.es),
       CASE WHEN s.status = 'pending' AND s.layer > s.p THEN s.indeg ELSE 0 END,
       s.downstream, s.max_retries, s.es + s.layer * s.d,
       CASE WHEN s.status = 'running' THEN s.worker END,
       CASE WHEN s.status = 'running' THEN
           CASE WHEN s.expired THEN statement_timestamp() - interval '3 minutes'
                ELSE statement_timestamp() + interval '5 minutes' END END,
       s.status = 'pending' AND s.x_status <> 'running',
       CASE s.status WHEN 'completed' THEN 1 WHEN 'running' THEN 1
                     WHEN 'failed' THEN s.max_retries + 1 ELSE 0 END,
       s.node_type
  FROM studio_steps s
 ORDER BY s.n, s.ord;

-- @chunk_events
-- The history the transitions write: per execution pending -> running and
-- its last transition; per step pending -> running, each retry (running ->
-- pending with the error, pending -> running), running -> completed or
-- failed, or pending -> skipped; ids in time order within an execution.
-- execution_events has no trigger on INSERT but its two foreign keys' (two
-- lookups per row, half the seeding time at 1M): the rows come from the
-- chunk's own executions and steps, so the keys hold by construction, and
-- studio.rs checks them set-based after the last chunk (anti-joins).
SET session_replication_role = replica;
INSERT INTO execution_events (execution_id, step_id, from_status, to_status, payload, created_at)
SELECT ev.execution_id, ev.step_id, ev.from_status, ev.to_status, ev.payload, ev.at
  FROM (
    SELECT p.n, p.id AS execution_id, NULL::uuid AS step_id, e.from_status, e.to_status, e.payload,
           e.at, e.seq
      FROM studio_plan p
           CROSS JOIN LATERAL (VALUES
               ('pending', 'running', NULL::jsonb, p.started_at, 0),
               ('running', p.status::text,
                CASE WHEN p.error IS NOT NULL THEN jsonb_build_object('error', p.error) END,
                coalesce(p.completed_at, p.started_at + p.p * p.d + interval '10 ms'), 9)
           ) AS e(from_status, to_status, payload, at, seq)
     WHERE p.n BETWEEN {lo} AND {hi} AND p.status <> 'pending'
       AND NOT (e.seq = 9 AND p.status = 'running')
    UNION ALL
    SELECT s.n, s.execution_id, s.id, 'pending', 'running',
           jsonb_build_object('node_id', s.node, 'retry_count', 0, 'worker', s.worker),
           s.es + s.layer * s.d + interval '50 ms', 1
      FROM studio_steps s WHERE s.status IN ('completed', 'failed', 'running')
    UNION ALL
    SELECT s.n, s.execution_id, s.id, r.from_status, r.to_status, r.payload, r.at, r.seq
      FROM studio_steps s
           CROSS JOIN LATERAL generate_series(1, s.retry_count) AS k
           CROSS JOIN LATERAL (VALUES
               ('running', 'pending',
                jsonb_build_object('node_id', s.node, 'retry_count', k, 'worker', s.worker,
                                   'error', s.fail_error),
                s.es + s.layer * s.d + k * s.d / (s.max_retries + 1), 2),
               ('pending', 'running',
                jsonb_build_object('node_id', s.node, 'retry_count', k, 'worker', s.worker),
                s.es + s.layer * s.d + k * s.d / (s.max_retries + 1) + interval '50 ms', 3)
           ) AS r(from_status, to_status, payload, at, seq)
     WHERE s.status = 'failed'
    UNION ALL
    SELECT s.n, s.execution_id, s.id, 'running', s.status::text,
           jsonb_strip_nulls(jsonb_build_object(
               'node_id', s.node, 'retry_count', s.retry_count, 'worker', s.worker,
               'error', CASE WHEN s.status = 'failed' THEN s.fail_error END)),
           s.completed_at, 4
      FROM studio_steps s WHERE s.status IN ('completed', 'failed')
    UNION ALL
    SELECT s.n, s.execution_id, s.id, 'pending', 'skipped',
           jsonb_build_object('node_id', s.node, 'retry_count', 0), s.completed_at, 10
      FROM studio_steps s WHERE s.status = 'skipped'
  ) ev
 ORDER BY ev.n, ev.at, ev.seq;
SET session_replication_role = DEFAULT;

-- @finish
-- Queues: one limited, one paused (the queues page lists them with the
-- queues that only have steps); three schedules.
INSERT INTO queues (name, paused, max_running) VALUES ('payments', false, 100000), ('email', true, NULL);
INSERT INTO schedules (name, workflow_id, cron, time_zone, next_fire_at, last_fired_at, paused)
SELECT v.name, w.id, v.cron, v.tz, v.next_at, v.last_at, v.paused
  FROM (VALUES
          ('nightly-report', 'nightly-report', '0 2 * * *', 'Europe/Berlin',
           date_trunc('day', statement_timestamp()) + interval '1 day 1 hour',
           date_trunc('day', statement_timestamp()) + interval '1 hour', false),
          ('invoice-sync-hourly', 'invoice-sync', '0 * * * *', 'UTC',
           date_trunc('hour', statement_timestamp()) + interval '1 hour',
           date_trunc('hour', statement_timestamp()), false),
          ('refund-audit', 'payment-refund', '30 6 * * 1', 'UTC',
           date_trunc('week', statement_timestamp()) + interval '7 days 6 hours 30 minutes', NULL, true)
       ) v(name, workflow, cron, tz, next_at, last_at, paused)
       JOIN studio_workflows w ON w.name = v.workflow;
