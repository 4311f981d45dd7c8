--[[
  The events scripts return to the hubs: one constructor per kind. Each is an
  array of strings and integers (hub/events.py reads them):
    {'dispatch', node_hub, node_id, job_id, attempt, session_id, src, tgt,
     deadline_ms, payload, audio_hub, session_hub, ref}
    (audio_hub: the hub that keeps the job's audio, '' when it has none)
    {'result', session_hub, session_id, job_id, ref, status, result, error}
    {'cancel', node_hub, node_id, job_id, attempt, reason}
    {'replaced', old_hub, node_id, old_epoch}
    {'lost', node_hub, node_id, epoch}
]]
--- @include "includes/base"

-- A job attempt started on a node: the hub that keeps its audio (or, for a
-- job without audio, whichever hub reads the event) sends the job, the
-- session's hub sends 'accepted'. `j` holds the job's ATTEMPT_FIELDS,
-- `shub_now` the hub holding the session's socket.
local function dispatch_event(jid, j, nid, attempt, node_hub, shub_now)
  return { 'dispatch', node_hub, nid, jid, attempt, j.session, j.src, j.tgt, tonumber(j.deadline),
    j.payload or '{}', (j.audio == '1' and j.shub) or '', shub_now, j.ref or '' }
end

-- A job ended: the session's hub sends 'result'.
local function result_event(session_hub_id, sid, jid, ref, status, result, err)
  return { 'result', session_hub_id, sid, jid, ref, status, result, err }
end

-- A node must stop an attempt: its hub sends 'cancel'.
local function cancel_event(node_hub, nid, jid, attempt, reason)
  return { 'cancel', node_hub, nid, jid, attempt, reason }
end

-- A node id registered on a newer connection: the old connection must close.
local function replaced_event(old_hub, nid, old_epoch)
  return { 'replaced', old_hub, nid, old_epoch }
end

-- A node was taken out: its hub closes the connection if it is still open.
local function lost_event(node_hub, nid, epoch)
  return { 'lost', node_hub, nid, epoch }
end
