-- Orthanc routing for qcgate (deploy/orthanc/README.md).
--
--  CT from the scanner      -> forwarded to the AI service and to the gate
--  SEG from the AI service  -> forwarded to the gate
--  QC SEG + SR from the gate (calling AE QCGATE) -> kept in Orthanc, never forwarded again
--
-- Routing is per stable series (StableAge in orthanc.json), so whole series are sent in one
-- association. A failed send is logged and retried by the next call of RetryPending() below.

local GATE_AET = 'QCGATE'      -- node.ae_title of the gate (also the calling AE of its results)
local GATE_MODALITY = 'qcgate' -- the DicomModalities entry of the gate
local AI_MODALITY = 'ai'       -- the DicomModalities entry of the AI service
local AI_AET = 'AISEG'         -- calling AE of the AI service's results

pending = pending or {}        -- series ids whose send to the gate failed

local function FirstInstanceOrigin(seriesId)
  -- The calling AE that sent the series (Orthanc keeps it as instance metadata "RemoteAET").
  local series = ParseJson(RestApiGet('/series/' .. seriesId))
  local first = series['Instances'][1]
  if first == nil then
    return nil
  end
  local ok, remote = pcall(RestApiGet, '/instances/' .. first .. '/metadata/RemoteAET')
  if ok then
    return remote
  end
  return nil
end

local function SendSeries(seriesId, modality)
  local ok, err = pcall(RestApiPost, '/modalities/' .. modality .. '/store', seriesId)
  if ok then
    PrintRecursive('qcgate routing: sent series ' .. seriesId .. ' to ' .. modality)
    return true
  end
  PrintRecursive('qcgate routing: sending series ' .. seriesId .. ' to ' .. modality .. ' failed: ' .. tostring(err))
  return false
end

function OnStableSeries(seriesId, tags, metadata)
  local modality = tags['Modality']
  local origin = FirstInstanceOrigin(seriesId)
  if origin == GATE_AET then
    return -- the gate's own QC SEG / SR: never send it back (the gate would take it as an AI member)
  end
  if modality == 'CT' then
    if origin ~= AI_AET then
      SendSeries(seriesId, AI_MODALITY)
    end
    if not SendSeries(seriesId, GATE_MODALITY) then
      pending[seriesId] = true
    end
  elseif modality == 'SEG' and origin == AI_AET then
    if not SendSeries(seriesId, GATE_MODALITY) then
      pending[seriesId] = true
    end
  end
end

-- Retry failed sends to the gate once a minute. The gate acknowledges identical re-sends with
-- Success and stores nothing twice, so a retry is always safe.
function RetryPending()
  for seriesId, _ in pairs(pending) do
    if SendSeries(seriesId, GATE_MODALITY) then
      pending[seriesId] = nil
    end
  end
end

function OnHeartBeat()
  RetryPending()
end
