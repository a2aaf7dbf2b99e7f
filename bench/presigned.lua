-- wrk script: sends pre-signed DOKU requests from a file, one line per request:
--   Request-Id \t Request-Timestamp \t Signature \t Client-Id \t body
-- Each wrk thread takes every n-th line, so no two threads send the same Request-Id.
-- Usage: wrk -s bench/presigned.lua URL -- FILE THREADS TARGET_PATH [ANSWERS_FILE]
-- Without ANSWERS_FILE the lines are sent round and round (inquiries: a line sent again is a replay).
-- With it, each line is sent at most once (a notification sent again is a repeat, another path), a
-- thread out of lines stops, and ANSWERS_FILE gets one line per answer: Request-Id \t HTTP status
-- (the Request-Id dipc echoes), so bench/run.py can check each 200 against the database afterwards.

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
  if answers_path == nil then
    index = index % #requests + 1
    return requests[index]
  end
  if index == #requests then
    -- wrk wants a request from us; this one is written as the thread stops, and never read or counted.
    wrk.thread:stop()
    return wrk.format("GET", "/healthz")
  end
  index = index + 1
  return requests[index]
end

function response(status, headers, body)
  if answers_path ~= nil then
    answers[#answers + 1] = (headers["Request-Id"] or "") .. "\t" .. status
  end
end

function done(summary, latency, requests)
  local path = threads[1]:get("answers_path")
  if path == nil then
    return
  end
  local out = io.open(path, "w")
  for _, thread in ipairs(threads) do
    for _, line in ipairs(thread:get("answers")) do
      out:write(line, "\n")
    end
  end
  out:close()
end
