-- Orthanc routing for qcgate (deploy/orthanc/README.md). Tested with Orthanc 1.10.1 (Debian 12);
-- uses OnHeartBeat on Orthanc >= 1.11.1 when LuaHeartBeatPeriod > 0.
--
--   CT from the scanner             -> sent to the AI service and to the gate
--   SEG from the AI service         -> sent to the gate
--   anything the gate sent back     -> kept in Orthanc, never sent anywhere (the loop guard)
--
-- Every send is an asynchronous Orthanc store job (POST /modalities/{id}/store, "Asynchronous").
-- Orthanc reports its end with OnJobSuccess / OnJobFailure; a failure is retried with exponential
-- backoff. The state of every unfinished send lives in a small state file (QcgateRouting.StateFile,
-- rewritten atomically), so it survives an Orthanc restart; the outcome of every send is also
-- written as series metadata (QcgateGateRouting / QcgateAiRouting, see UserMetadata) for operators.
--
-- Orthanc 1.10 has no timer for Lua. Due retries are therefore run on every callback this script
-- gets (a series becoming stable, a job ending, Orthanc starting), on OnHeartBeat where it exists,
-- and on any authenticated HTTP request (IncomingHttpRequestFilter: at most one "tick" per
-- TickSeconds, an empty store job whose end runs the due retries). On a quiet 1.10 server, have a
-- timer GET /system once a minute (README.md).
--
-- Settings: the "QcgateRouting" section of the Orthanc configuration (orthanc.json).

local settings = GetOrthancConfiguration()['QcgateRouting'] or {}
local modalities = GetOrthancConfiguration()['DicomModalities'] or {}

local function Setting(name, default)
  local value = settings[name]
  if value == nil then
    return default
  end
  return value
end

local GATE_MODALITY = Setting('GateModality', 'qcgate')   -- DicomModalities entry of the gate
local AI_MODALITY = Setting('AiModality', 'ai')           -- of the AI service ('' = scanner sends to it)
local STATE_FILE = Setting('StateFile', '/var/lib/qcgate-orthanc/qcgate-routing.state')
local RETRY_BASE = tonumber(Setting('RetryBaseSeconds', 30))
local RETRY_MAX = tonumber(Setting('RetryMaxSeconds', 900))
local MAX_ATTEMPTS = tonumber(Setting('RetryMaxAttempts', 200))  -- then given up (logged, metadata)
local TICK_SECONDS = tonumber(Setting('TickSeconds', 30))
local METADATA = { [GATE_MODALITY] = 'QcgateGateRouting' }
if AI_MODALITY ~= '' then
  METADATA[AI_MODALITY] = 'QcgateAiRouting'
end

local function ModalityAet(name)
  local entry = modalities[name]
  if type(entry) ~= 'table' then
    return nil
  end
  return entry['AET'] or entry[1]   -- object form or the [AET, host, port] array form
end

local GATE_AET = ModalityAet(GATE_MODALITY) or 'QCGATE'   -- also the calling AE of the gate's results
local AI_AET = AI_MODALITY ~= '' and ModalityAet(AI_MODALITY) or nil

local function Log(message)
  print('qcgate routing: ' .. message)
end

-- ---------------------------------------------------------------- state (one line per open send)
-- "<series id> <modality> <state> <attempts> <next attempt, epoch s> <job id or ->"
-- state: sending (a store job runs) | waiting (failed, retried at <next attempt>)

local function KeyOf(seriesId, modality)
  return seriesId .. ' ' .. modality
end

local function ReadStateFile()
  local entries = {}
  local file = io.open(STATE_FILE, 'r')
  if file == nil then
    return entries
  end
  for line in file:lines() do
    local seriesId, modality, state, attempts, nextAt, job = line:match('^(%S+) (%S+) (%S+) (%d+) (%d+) (%S+)$')
    if seriesId ~= nil then
      entries[KeyOf(seriesId, modality)] = { series = seriesId, modality = modality, state = state,
        attempts = tonumber(attempts), nextAt = tonumber(nextAt), job = job }
    end
  end
  file:close()
  return entries
end

local pending = nil   -- loaded lazily (Initialize, or the first callback after a script reload)

local function Pending()
  if pending == nil then
    pending = ReadStateFile()
    for _, entry in pairs(pending) do
      if entry.state == 'sending' then
        -- Orthanc stopped while the job ran: its outcome is unknown, send again (the gate
        -- acknowledges an identical re-send without storing anything twice).
        entry.state = 'waiting'
        entry.nextAt = 0
      end
    end
  end
  return pending
end

local function SaveState()
  local temporary = STATE_FILE .. '.tmp'
  local file, problem = io.open(temporary, 'w')
  if file == nil then
    Log('cannot write the state file ' .. temporary .. ': ' .. tostring(problem))
    return
  end
  for _, e in pairs(Pending()) do
    file:write(string.format('%s %s %s %d %d %s\n', e.series, e.modality, e.state, e.attempts, e.nextAt, e.job or '-'))
  end
  file:close()
  local ok, renameProblem = os.rename(temporary, STATE_FILE)
  if not ok then
    Log('cannot replace the state file ' .. STATE_FILE .. ': ' .. tostring(renameProblem))
  end
end

local function SetMetadata(seriesId, modality, text)
  local name = METADATA[modality]
  if name ~= nil then
    RestApiPut('/series/' .. seriesId .. '/metadata/' .. name, text)
  end
end

local function Now()
  return os.time()
end

local function Stamp()
  return os.date('!%Y-%m-%dT%H:%M:%SZ')
end

-- ---------------------------------------------------------------- sending

local function Submit(entry)
  -- RestApiPost returns nil on failure (Orthanc 1.10 and later do not raise): check the result.
  local body = DumpJson({ Resources = { entry.series }, Asynchronous = true }, true)
  local answer = RestApiPost('/modalities/' .. entry.modality .. '/store', body)
  local job = answer and ParseJson(answer)['ID']
  if job == nil then
    entry.state = 'waiting'
    entry.attempts = entry.attempts + 1
    entry.nextAt = Now() + math.min(RETRY_MAX, RETRY_BASE * 2 ^ (entry.attempts - 1))
    Log('could not submit the send of series ' .. entry.series .. ' to ' .. entry.modality .. '; retry in '
        .. (entry.nextAt - Now()) .. ' s')
    return
  end
  entry.state = 'sending'
  entry.job = job
  Log('sending series ' .. entry.series .. ' to ' .. entry.modality .. ' (attempt ' .. (entry.attempts + 1)
      .. ', job ' .. job .. ')')
end

local function Route(seriesId, modality)
  local entries = Pending()
  local key = KeyOf(seriesId, modality)
  local entry = entries[key]
  if entry ~= nil and entry.state == 'sending' then
    -- New instances arrived while a send runs: send the whole series again once it has ended.
    entry.resend = true
    return
  end
  entry = { series = seriesId, modality = modality, state = 'waiting', attempts = 0, nextAt = 0 }
  entries[key] = entry
  Submit(entry)
  SaveState()
end

local function RetryDue()
  local now = Now()
  local changed = false
  for key, entry in pairs(Pending()) do
    if entry.state == 'waiting' and entry.nextAt <= now then
      if RestApiGet('/series/' .. entry.series) == nil then
        Log('series ' .. entry.series .. ' was deleted; dropping its send to ' .. entry.modality)
        Pending()[key] = nil
      else
        Submit(entry)
      end
      changed = true
    end
  end
  if changed then
    SaveState()
  end
end

local function JobEntry(jobId)
  -- Map a finished job back to its send by job id (state file), or by what it sent and to whom.
  for _, entry in pairs(Pending()) do
    if entry.job == jobId then
      return entry
    end
  end
  return nil
end

-- ---------------------------------------------------------------- the loop guard

local function IsFromGate(seriesId, tags, metadata)
  local origin = metadata and metadata['RemoteAET']
  if origin == nil then
    local series = ParseJson(RestApiGet('/series/' .. seriesId) or '{}')
    local first = series['Instances'] and series['Instances'][1]
    origin = first and RestApiGet('/instances/' .. first .. '/metadata/RemoteAET')
  end
  if origin == GATE_AET then
    return true, origin
  end
  -- Belt and braces: the gate's own outputs (QC SEG, SR, uncertainty map) whoever stored them.
  local description = tags['SeriesDescription'] or ''
  local qcTitle = description:sub(1, 3) == 'QC ' or description:sub(1, 13) == 'SYNTHETIC QC '
  if tags['Manufacturer'] == 'qcgate' and qcTitle and description:find('(qcgate)', 1, true) then
    return true, origin
  end
  return false, origin
end

-- ---------------------------------------------------------------- Orthanc callbacks

function OnStableSeries(seriesId, tags, metadata)
  local modality = tags['Modality']
  local fromGate, origin = IsFromGate(seriesId, tags, metadata)
  if fromGate then
    Log('series ' .. seriesId .. ' (' .. tostring(modality) .. ') came from the gate: not routed')
  elseif modality == 'CT' then
    if AI_AET ~= nil and origin ~= AI_AET then
      Route(seriesId, AI_MODALITY)
    end
    Route(seriesId, GATE_MODALITY)
  elseif modality == 'SEG' and (AI_AET == nil or origin == AI_AET) then
    Route(seriesId, GATE_MODALITY)
  end
  RetryDue()
end

function OnJobSuccess(jobId)
  local entry = JobEntry(jobId)
  if entry ~= nil then
    Pending()[KeyOf(entry.series, entry.modality)] = nil
    Log('sent series ' .. entry.series .. ' to ' .. entry.modality .. ' (attempt ' .. (entry.attempts + 1) .. ')')
    SetMetadata(entry.series, entry.modality, 'sent ' .. Stamp() .. ' attempts=' .. (entry.attempts + 1))
    if entry.resend then
      Route(entry.series, entry.modality)
    end
    SaveState()
  end
  RetryDue()
end

function OnJobFailure(jobId)
  local entry = JobEntry(jobId)
  if entry ~= nil then
    local job = ParseJson(RestApiGet('/jobs/' .. jobId) or '{}')
    local reason = tostring(job['ErrorDetails'] or job['ErrorDescription'] or 'unknown error')
    entry.attempts = entry.attempts + 1
    entry.job = nil
    if MAX_ATTEMPTS > 0 and entry.attempts >= MAX_ATTEMPTS then
      Pending()[KeyOf(entry.series, entry.modality)] = nil
      Log('GIVING UP sending series ' .. entry.series .. ' to ' .. entry.modality .. ' after ' .. entry.attempts
          .. ' attempts: ' .. reason)
      SetMetadata(entry.series, entry.modality, 'failed ' .. Stamp() .. ' attempts=' .. entry.attempts .. ' ' .. reason)
    else
      local delay = math.min(RETRY_MAX, RETRY_BASE * 2 ^ (entry.attempts - 1))
      entry.state = 'waiting'
      entry.nextAt = Now() + math.floor(delay)
      entry.resend = nil
      Log('sending series ' .. entry.series .. ' to ' .. entry.modality .. ' failed (attempt ' .. entry.attempts
          .. '): ' .. reason .. '; retry in ' .. math.floor(delay) .. ' s')
      SetMetadata(entry.series, entry.modality, 'retrying ' .. Stamp() .. ' attempts=' .. entry.attempts
          .. ' next=' .. os.date('!%Y-%m-%dT%H:%M:%SZ', entry.nextAt) .. ' ' .. reason)
    end
    SaveState()
  end
end

function Initialize()
  Pending()
  RetryDue()
end

-- Orthanc >= 1.11.1 with "LuaHeartBeatPeriod" > 0. Never called by Orthanc 1.10.
function OnHeartBeat()
  RetryDue()
end

-- Orthanc 1.10 runs this filter in a second Lua context that shares no variables with the
-- callbacks above: it only reads the state file and, when a retry is due, submits an empty store
-- job whose OnJobSuccess (in the main context) runs RetryDue(). Must return true (allow).
local lastTick = 0
function IncomingHttpRequestFilter(method, uri, ip, username, httpHeaders)
  local now = Now()
  if now - lastTick >= TICK_SECONDS then
    lastTick = now
    local ok, due = pcall(function()
      for _, entry in pairs(ReadStateFile()) do
        if entry.state == 'waiting' and entry.nextAt <= now then
          return true
        end
      end
      return false
    end)
    if ok and due then
      RestApiPost('/modalities/' .. GATE_MODALITY .. '/store', '{"Resources":[],"Asynchronous":true}')
    end
  end
  return true
end
