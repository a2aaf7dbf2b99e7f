-- wrk script: sends pre-signed DOKU payment notifications from a file, each at most once, and keeps
-- every answer's status with the Request-Id the server echoes, so bench/run.py can check each 200
-- against the database afterwards.
-- File lines as for inquiry.lua: Request-Id \t Request-Timestamp \t Signature \t Client-Id \t body
-- Each wrk thread takes every n-th line. Unlike inquiry.lua it never wraps round: a second send would be
-- a repeat, another path (bench/run.py replays on purpose, after this). A thread out of lines stops.
-- Usage: wrk -s bench/notification.lua URL -- FILE THREADS TARGET_PATH ANSWERS_FILE
-- ANSWERS_FILE gets one line per answer: Request-Id \t HTTP status.

local counter = 0
local threads = {}

function setup(thread)
  thread:set("id", counter)
  threads[#threads + 1] = thread
  counter = counter + 1
end

local requests = {}
local index = 0
answers = {} -- global: done() reads it from each thread
answers_path = nil

function init(args)
  local file, threads, target = args[1], tonumber(args[2]), args[3]
  answers_path = args[4]
  local n = 0
  for line in io.lines(file) do
    if n % threads == id then
      local rid, ts, sig, cid, body = line:match("^([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t(.*)$")
      requests[#requests + 1] = wrk.format("POST", target, {
        ["Content-Type"] = "application/json",
        ["Client-Id"] = cid,
        ["Request-Id"] = rid,
        ["Request-Timestamp"] = ts,
        ["Signature"] = sig,
      }, body)
    end
    n = n + 1
  end
end

function request()
  if index == #requests then
    -- wrk wants a request from us; this one is written as the thread stops, and never read or counted.
    wrk.thread:stop()
    return wrk.format("GET", "/healthz")
  end
  index = index + 1
  return requests[index]
end

function response(status, headers, body)
  answers[#answers + 1] = (headers["Request-Id"] or "") .. "\t" .. status
end

function done(summary, latency, requests)
  local out = io.open(threads[1]:get("answers_path"), "w")
  for _, thread in ipairs(threads) do
    for _, line in ipairs(thread:get("answers")) do
      out:write(line, "\n")
    end
  end
  out:close()
end
