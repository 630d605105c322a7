-- Drives salt/chatmail/dovecot/files/auth-doveauth.lua the way Dovecot 2.4's Lua
-- passdb/userdb does, with Dovecot's API stood in:
--   lua5.4 lua_auth_harness.lua SCRIPT passdb USER PASSWORD_HEX
--   lua5.4 lua_auth_harness.lua SCRIPT userdb USER
-- The password is hex-encoded so that any bytes (TAB, LF, NUL) survive argv.
-- Prints "VERIFY<TAB>hash<TAB>plain_hex" for each password check the script asks Dovecot
-- for, then "RESULT<TAB>code<TAB>message" and "FIELD<TAB>key<TAB>value" lines.
dovecot = { auth = {
  PASSDB_RESULT_OK = "OK", PASSDB_RESULT_USER_UNKNOWN = "USER_UNKNOWN",
  PASSDB_RESULT_PASSWORD_MISMATCH = "PASSWORD_MISMATCH",
  PASSDB_RESULT_INTERNAL_FAILURE = "INTERNAL_FAILURE",
  USERDB_RESULT_OK = "OK", USERDB_RESULT_USER_UNKNOWN = "USER_UNKNOWN",
  USERDB_RESULT_INTERNAL_FAILURE = "INTERNAL_FAILURE",
} }
local function unhex(text)
  return (text:gsub("%x%x", function(pair) return string.char(tonumber(pair, 16)) end))
end
local function hex(text)
  return (text:gsub(".", function(c) return string.format("%02x", c:byte()) end))
end
dofile(arg[1])
assert(script_init() == 0)
local req = { user = arg[3] }
function req:password_verify(hash, plain)
  print("VERIFY\t" .. hash .. "\t" .. hex(plain))
  return 1, nil
end
local result, extra
if arg[2] == "passdb" then
  result, extra = auth_password_verify(req, unhex(arg[4]))
else
  result, extra = auth_userdb_lookup(req)
end
print("RESULT\t" .. result .. "\t" .. (type(extra) == "string" and extra:gsub("\n", " ") or ""))
if type(extra) == "table" then
  for key, value in pairs(extra) do print("FIELD\t" .. key .. "\t" .. tostring(value)) end
end
