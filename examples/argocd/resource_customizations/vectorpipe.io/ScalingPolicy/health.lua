-- Argo CD health of a vectorpipe ScalingPolicy, from its status conditions.
--   Suspended:   Active=False because its pipeline is suspended
--   Progressing: the operator has not judged this generation yet
--   Degraded:    Active=False for any other reason (missing target, conflict, invalid spec), or
--                AbleToScale=False because metrics cannot be read
--   Healthy:     Active=True (also in dryRun, and while a cooldown runs or a bound clips)
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

if obj.status == nil or obj.status.observedGeneration == nil
    or obj.metadata.generation == nil
    or obj.status.observedGeneration < obj.metadata.generation then
  hs.status = "Progressing"
  hs.message = "waiting for the operator to judge the latest spec"
  return hs
end

local active = condition(obj, "Active")
if active == nil then
  hs.status = "Progressing"
  hs.message = "waiting for the first poll"
  return hs
end
if active.status ~= "True" then
  if active.reason == "TargetSuspended" then
    hs.status = "Suspended"
  else
    hs.status = "Degraded"
  end
  hs.message = active.reason .. ": " .. (active.message or "")
  return hs
end

local able = condition(obj, "AbleToScale")
if able ~= nil and able.status ~= "True" and able.reason == "MetricsUnavailable" then
  hs.status = "Degraded"
  hs.message = able.reason .. ": " .. (able.message or "")
  return hs
end

hs.status = "Healthy"
local limited = condition(obj, "ScalingLimited")
if limited ~= nil and limited.status == "True" then
  hs.message = limited.reason .. ": " .. (limited.message or "")
else
  hs.message = active.message or "evaluating"
end
return hs
