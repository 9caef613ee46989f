-- Argo CD health of a vectorpipe EmbeddingPipeline, from its status conditions.
--   Suspended:   spec.suspend is true
--   Progressing: the operator has not seen this generation yet, or a rollout/scale is under way
--   Degraded:    Degraded=True (bad spec, missing Secret, index mismatch, stuck rollout)
--   Healthy:     Ready=True for the current generation
local hs = {}

local function condition(obj, type_)
  if obj.status == nil or obj.status.conditions == nil then
    return nil
  end
  for _, c in ipairs(obj.status.conditions) do
    if c.type == type_ then
      return c
    end
  end
  return nil
end

if obj.spec ~= nil and obj.spec.suspend == true then
  hs.status = "Suspended"
  hs.message = "spec.suspend is true: no workers run"
  return hs
end

if obj.status == nil or obj.status.observedGeneration == nil
    or obj.metadata.generation == nil
    or obj.status.observedGeneration < obj.metadata.generation then
  hs.status = "Progressing"
  hs.message = "waiting for the operator to reconcile the latest spec"
  return hs
end

local degraded = condition(obj, "Degraded")
if degraded ~= nil and degraded.status == "True" then
  hs.status = "Degraded"
  hs.message = degraded.reason .. ": " .. (degraded.message or "")
  return hs
end

local ready = condition(obj, "Ready")
if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = ready.message or "workers are ready"
  return hs
end

hs.status = "Progressing"
if ready ~= nil then
  hs.message = ready.reason .. ": " .. (ready.message or "")
else
  hs.message = "waiting for the workers"
end
return hs
