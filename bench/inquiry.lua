-- wrk script: replays pre-signed DOKU inquiries from a file, one line per request:
--   Request-Id \t Request-Timestamp \t Signature \t Client-Id \t body
-- Each wrk thread takes every n-th line, so no two threads send the same Request-Id.
-- Usage: wrk -s bench/inquiry.lua URL -- FILE THREADS TARGET_PATH

local counter = 0

function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
end

local requests = {}
local index = 0

function init(args)
  local file, threads, target = args[1], tonumber(args[2]), args[3]
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
  index = index % #requests + 1
  return requests[index]
end
