-- wrk script for bench/api.sh: POST /v1/verifications with a new phone number every request.
--
-- Numbers are +39 33 followed by eight digits, which libphonenumber treats as valid Italian
-- mobiles. Each wrk thread numbers its requests from its own block of ten million, so no two
-- requests in a run share a number and the gateway's per-phone limit never triggers.
-- At the end it prints one line, starting with "wrk-result", that api.sh parses.

local block_size = 10000000
local next_thread_id = 0

function setup(thread)
  thread:set("thread_id", next_thread_id)
  next_thread_id = next_thread_id + 1
end

local counter = 0
local first_number = 0
local path = "/v1/verifications"
local headers = { ["Content-Type"] = "application/json" }

function init(args)
  first_number = (thread_id or 0) * block_size
  if os.getenv("API_KEY") then
    headers["Authorization"] = "Bearer " .. os.getenv("API_KEY")
  end
end

function request()
  local number = first_number + counter
  counter = counter + 1
  local body = string.format('{"phone":"+3933%08d"}', number)
  return wrk.format("POST", path, headers, body)
end

function done(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    "wrk-result requests=%d duration_us=%d p50_us=%d p99_us=%d " ..
    "connect=%d read=%d write=%d timeout=%d status=%d\n",
    summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99),
    errors.connect, errors.read, errors.write, errors.timeout, errors.status))
end
