-- wrk script: prints one JSON line (prefixed with "WRKJSON ") with totals and latency
-- percentiles in microseconds, for benches/lib/bench.py to parse.
-- Optional: WRK_CLOSE=1 sends "Connection: close" (one request per connection).
if os.getenv("WRK_CLOSE") == "1" then
  wrk.headers["Connection"] = "close"
end
local host = os.getenv("WRK_HOST")
if host and host ~= "" then
  wrk.headers["Host"] = host
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"err_connect":%d,"err_read":%d,"err_write":%d,"err_status":%d,"err_timeout":%d,' ..
    '"p50_us":%d,"p99_us":%d,"p999_us":%d,"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9),
    latency.max, latency.mean))
end
