"""The read path as one Redis function library: its Lua, which the API loads.

Readers run only these functions, by FCALL_RO: the library is the service's, loaded by the API
(``load_functions``) on every primary; a reader's ACL user may not load code, so it cannot
wedge Redis with a script of its own. Functions persist in the AOF/RDB and replicate, unlike the
script cache; a Redis that lost them anyway (FUNCTION FLUSH, a fresh node) gets them again from
the API on its next read.

On a single Redis the read is one call, ``pm_read``: resolve the active pointer (unless the
version is given), check that the set is sealed and GET the users' values; Redis runs a function
atomically, so a promotion (one HSET of the pointers hash) lands either before or after it, and
a set that is still being written is never read. The value keys depend on the pointer, so that
function cannot declare them. Redis Cluster refuses undeclared keys in another node's slots, so
there the read takes two calls: ``pm_resolve`` on the registry's slot, then ``pm_read_set`` with
the set's keys declared (one slot, one hash tag). A promotion between the two hands the reader
the previous version, which stays sealed and readable for the grace period: never a half-written
set. ``pm_format`` returns a sealed set's metadata (what a reader without the API's rights needs
to decode values).

A function checks every key it is handed against the model and version it is asked for, so a
caller cannot point the seal check at one set and the GETs at another key.

The names, the keys they are handed, the reply format and the caller (``ReadFunctions``) are the
client's (``prompt_migration_client.functions``), so that a direct reader needs no server code.
The values go back as they are: a Lua table.concat of them costs Redis more than the GETs
(bench/README.md, "Serving"), and hiredis parses the elements in C. Key names match
``keys.SetKeys``.
"""

from __future__ import annotations

from prompt_migration_client.functions import (
    DEFAULT_MODEL,
    FORMAT,
    LIBRARY_NAME,
    READ,
    READ_SET,
    RESOLVE,
)

from app.store.meta import SEALED

LIBRARY = f"""#!lua name={LIBRARY_NAME}

local function resolve(active, model, version)
  if model == '' then
    model = redis.call('HGET', active, '{DEFAULT_MODEL}')
    if not model then return nil, nil, {{0}} end
  end
  if version == '' then
    version = redis.call('HGET', active, model)
    if not version then return nil, nil, {{1, model}} end
  end
  return model, version, nil
end

-- The set's key prefix, after checking that ``meta`` is its meta key.
local function set_prefix(meta, model, version)
  local prefix = 'pm:{{' .. model .. ':' .. version .. '}}'
  if meta ~= prefix .. ':meta' then
    error('pm: the first key must be the meta key of ' .. model .. ' version ' .. version)
  end
  return prefix
end

-- nil when the set is sealed, else the reply that says why it cannot be read.
local function refused(meta, model, version)
  local state = redis.call('HGET', meta, 'state')
  if state ~= '{SEALED}' then return {{2, model, version, state or ''}} end
  return nil
end

local function read(keys, args)
  local model, version, early = resolve(keys[1], args[1], args[2])
  if early then return early end
  local prefix = 'pm:{{' .. model .. ':' .. version .. '}}'
  local no = refused(prefix .. ':meta', model, version)
  if no then return no end
  local reply = {{3, model, version}}
  local values = prefix .. ':u:'
  for i = 3, #args do
    reply[i + 1] = redis.call('GET', values .. args[i])
  end
  return reply
end

local function resolve_only(keys, args)
  local model, version, early = resolve(keys[1], args[1], args[2])
  if early then return early end
  return {{3, model, version}}
end

local function read_set(keys, args)
  local model, version = args[1], args[2]
  local values = set_prefix(keys[1], model, version) .. ':u:'
  local no = refused(keys[1], model, version)
  if no then return no end
  local reply = {{3, model, version}}
  for i = 2, #keys do
    if string.sub(keys[i], 1, #values) ~= values then
      error('pm: key ' .. i .. ' is not a value key of ' .. model .. ' version ' .. version)
    end
    reply[i + 2] = redis.call('GET', keys[i])
  end
  return reply
end

local function format(keys, args)
  local model, version = args[1], args[2]
  set_prefix(keys[1], model, version)
  local no = refused(keys[1], model, version)
  if no then return no end
  return {{3, model, version, redis.call('HGET', keys[1], 'doc')}}
end

redis.register_function{{function_name='{READ}', callback=read, flags={{'no-writes'}}}}
redis.register_function{{function_name='{RESOLVE}', callback=resolve_only, flags={{'no-writes'}}}}
redis.register_function{{function_name='{READ_SET}', callback=read_set, flags={{'no-writes'}}}}
redis.register_function{{function_name='{FORMAT}', callback=format, flags={{'no-writes'}}}}
"""
