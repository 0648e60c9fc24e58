-- wrk script for bench/serving.py: random users' prompts, one JSON line of results at the end.
--   wrk ... -s bench/wrk_prompts.lua -- MODE TOKEN MODEL USERS BATCH [DELAY_MS]
-- MODE: "single" (GET /users/{id}/prompt?model=MODEL), "batch" (POST /prompts/batch of BATCH
-- distinct users, JSON) or "safetensors" (the same batch as ?format=safetensors). User ids are u + 12 digits, 0 .. USERS-1: the ids bench/serving.py writes,
-- and the keys redis-benchmark's __rand_int__ produces. DELAY_MS > 0 paces each connection
-- (bench/upgrade.py reads at a steady rate beside a job instead of saturating the machine).

local counter = 0

function setup(thread)
  thread:set("seed", counter)
  counter = counter + 1
end

local mode, model, users, batch, headers

function init(args)
  mode, model, users, batch = args[1], args[3], tonumber(args[4]), tonumber(args[5])
  headers = { ["Authorization"] = "Bearer " .. args[2], ["Content-Type"] = "application/json" }
  math.randomseed(1000 + seed)
  local pause = tonumber(args[6] or "0") or 0
  if pause > 0 then
    -- wrk looks for delay() after init; the pause is not counted in the latency.
    function delay()
      return pause
    end
  end
end

local function user_id(n)
  return string.format("u%012d", n)
end

local function batch_body()
  local picked, ids = {}, {}
  while #ids < batch do
    local n = math.random(0, users - 1)
    if not picked[n] then
      picked[n] = true
      ids[#ids + 1] = '"' .. user_id(n) .. '"'
    end
  end
  return '{"model":"' .. model .. '","user_ids":[' .. table.concat(ids, ",") .. "]}"
end

function request()
  if mode == "batch" then
    return wrk.format("POST", "/prompts/batch", headers, batch_body())
  elseif mode == "safetensors" then
    return wrk.format("POST", "/prompts/batch?format=safetensors", headers, batch_body())
  end
  local path = "/users/" .. user_id(math.random(0, users - 1)) .. "/prompt?model=" .. model
  return wrk.format("GET", path, headers)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_RESULT {"requests":%d,"duration_us":%d,"bytes":%d,"errors":{"connect":%d,"read":%d,' ..
    '"write":%d,"status":%d,"timeout":%d},"latency_us":{"mean":%.1f,"p50":%d,"p99":%d,' ..
    '"p999":%d,"max":%d}}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency.mean, latency:percentile(50), latency:percentile(99),
    latency:percentile(99.9), latency.max))
end
