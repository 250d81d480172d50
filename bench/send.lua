-- wrk script: POST /v1/send as Herald does, every request with its own Idempotency-Key
-- and code. Script arguments: a run id (keys stay unique across runs), the API key,
-- optionally "nokey" to send no Idempotency-Key (bench/idempotency_bench.py's baseline), and
-- optionally "trace" to send a W3C traceparent, a trace of its own per request (bench/tracing_bench.py).
-- done() prints one line "BENCH {json}" that bench/run.py reads.

local threads = {}

function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end

function init(args)
  run_id = args[1] or tostring(os.time())
  headers = {["Content-Type"] = "application/json", ["X-API-Key"] = args[2] or ""}
  keyed = args[3] ~= "nokey"
  traced = args[4] == "trace"
  counter = 0
end

function request()
  counter = counter + 1
  if keyed then headers["Idempotency-Key"] = string.format("bench-%s-%d-%d", run_id, tid, counter) end
  if traced then
    headers["traceparent"] = string.format("00-4bf92f3577b34da6%08x%08x-%016x-01", tid, counter, counter)
  end
  local body = string.format(
    '{"channel":"email","to":"user%d@example.com","subject":"Verification code",' ..
    '"template":"login","locale":"en","params":{"code":"%06d"}}', counter % 1000, counter % 1000000)
  return wrk.format("POST", "/v1/send", headers, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests":%d,"duration_us":%d,"non_2xx":%d,"socket_errors":%d,' ..
    '"p50_us":%d,"p99_us":%d}\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
