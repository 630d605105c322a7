-- Managed by Salt (chatmail formula). Dovecot 2.4 has no dict passdb/userdb any more:
-- this Lua passdb/userdb asks doveauth over its dict socket, with the same keys the
-- Dovecot 2.3 dict driver used (shared/passdb/<pw>"<user>, shared/userdb/<user>), so
-- doveauth keeps creating accounts on first login. Needs lua-socket (socket.unix).
local unix = require("socket.unix")

-- The environment variable is for the formula's tests; Dovecot does not set it.
local SOCKET = os.getenv("CHATMAIL_DOVEAUTH_SOCKET") or "/run/doveauth/doveauth.socket"

-- Dovecot's %E: a backslash before \\, " and ', so doveauth can split password"user.
local function escape(value)
  return (value:gsub('[\\"\']', function(c) return "\\" .. c end))
end

-- Dovecot's dict client tab-escapes every field (str_append_tabescaped_n): no TAB, CR,
-- LF or NUL stays in a request line, so a password cannot start a second request.
local TABESCAPES = { ["\1"] = "\1" .. "1", ["\0"] = "\1" .. "0", ["\t"] = "\1t",
  ["\r"] = "\1r", ["\n"] = "\1n" }
local function tabescape(value)
  return (value:gsub("[\0\1\t\r\n]", TABESCAPES))
end

local TABUNESCAPES = { ["1"] = "\1", ["0"] = "\0", t = "\t", r = "\r", n = "\n" }
local function tabunescape(value)
  return (value:gsub("\1(.?)", function(c) return TABUNESCAPES[c] or c end))
end

-- One dict lookup; returns the JSON text after "O", nil for "N", error() on failure.
local function lookup(key, user)
  local conn = assert(unix())
  conn:settimeout(10)
  assert(conn:connect(SOCKET))
  assert(conn:send("H3\t2\t0\t\tauth\n"))
  assert(conn:send("L" .. tabescape("shared/" .. key) .. "\t" .. tabescape(user) .. "\n"))
  local line = conn:receive("*l")
  conn:close()
  if line == nil then error("doveauth closed the connection") end
  local kind, value = line:sub(1, 1), line:sub(2)
  if kind == "O" then return tabunescape(value) end
  if kind == "N" then return nil end
  error("doveauth failed the lookup")
end

local function field(json, name)
  return json:match('"' .. name .. '"%s*:%s*"([^"]*)"')
end

function auth_password_verify(req, password)
  local ok, json = pcall(lookup, "passdb/" .. escape(password) .. '"' .. escape(req.user), req.user)
  if not ok then return dovecot.auth.PASSDB_RESULT_INTERNAL_FAILURE, json end
  if json == nil then return dovecot.auth.PASSDB_RESULT_USER_UNKNOWN, "no such user" end
  local hash = field(json, "password")
  if hash == nil then return dovecot.auth.PASSDB_RESULT_INTERNAL_FAILURE, "no password" end
  local result, err = req:password_verify(hash, password)
  if result ~= 1 then return dovecot.auth.PASSDB_RESULT_PASSWORD_MISMATCH, err or "mismatch" end
  return dovecot.auth.PASSDB_RESULT_OK, {}
end

function auth_userdb_lookup(req)
  local ok, json = pcall(lookup, "userdb/" .. escape(req.user), req.user)
  if not ok then return dovecot.auth.USERDB_RESULT_INTERNAL_FAILURE, json end
  if json == nil then return dovecot.auth.USERDB_RESULT_USER_UNKNOWN, "no such user" end
  return dovecot.auth.USERDB_RESULT_OK, {
    home = field(json, "home"), uid = field(json, "uid"), gid = field(json, "gid"),
  }
end

function script_init()
  return 0
end

function script_deinit()
end
