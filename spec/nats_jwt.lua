-- NATS decentralized authentication for the specs, without nsc (which Debian
-- 12 does not package): NKeys and JWTs made with the openssl CLI's Ed25519
-- and a few lines of encoding, as the nkeys and jwt libraries define them.
--   keypair(kind)            -> { seed = "S..", public = "O..|A..|U..", der = path }
--   jwt(issuer, subject, claims) -> a signed JWT (version 2, "ed25519-nkey")
--   creds(user_jwt, user)    -> the text of a .creds file
-- A nats-server in operator mode takes the operator's JWT and its accounts'
-- JWTs (server_conf); a client connects with a user's .creds file.
local json = require "cjson"
local support = require "support"

local M = {}
local q = support.quote

local sh = require("nats_support").sh

local function random_bytes(n)
  local f = assert(io.open("/dev/urandom", "rb"))
  local b = f:read(n)
  f:close()
  return b
end

-- CRC-16/XMODEM, as nkeys checks an encoded key with.
local function crc16(s)
  local crc = 0
  for i = 1, #s do
    crc = crc ~ (s:byte(i) << 8)
    for _ = 1, 8 do
      crc = (crc & 0x8000 ~= 0) and (((crc << 1) ~ 0x1021) & 0xffff) or ((crc << 1) & 0xffff)
    end
  end
  return crc
end

local function base32(s) -- RFC 4648, no padding
  local alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
  local out, bits, value = {}, 0, 0
  for i = 1, #s do
    value = (value << 8) | s:byte(i)
    bits = bits + 8
    while bits >= 5 do
      bits = bits - 5
      local k = (value >> bits) & 31
      out[#out + 1] = alphabet:sub(k + 1, k + 1)
    end
  end
  if bits > 0 then
    local k = (value << (5 - bits)) & 31
    out[#out + 1] = alphabet:sub(k + 1, k + 1)
  end
  return table.concat(out)
end

local function base64url(s) -- no padding
  local alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
  local out = {}
  for i = 1, #s, 3 do
    local a, b, c = s:byte(i, i + 2)
    local v = (a << 16) | ((b or 0) << 8) | (c or 0)
    local n = c and 4 or (b and 3 or 2)
    for k = 1, n do
      local x = (v >> (18 - 6 * (k - 1))) & 63
      out[#out + 1] = alphabet:sub(x + 1, x + 1)
    end
  end
  return table.concat(out)
end

local function with_crc(raw)
  local c = crc16(raw)
  return raw .. string.char(c & 0xff, c >> 8)
end

local PREFIX = { seed = 18 << 3, operator = 14 << 3, account = 0, user = 20 << 3 }

local dir -- the keys' files, removed by M.cleanup

-- A new NKey pair of this kind ("operator", "account" or "user").
function M.keypair(kind)
  dir = dir or support.tmpdir()
  local p = assert(PREFIX[kind], kind)
  local seed = random_bytes(32)
  local der = os.tmpname()
  os.remove(der)
  der = dir .. "/" .. der:match("[^/]+$") .. ".der"
  -- PKCS#8 of a raw Ed25519 private key: a fixed prefix, then the 32 bytes
  support.write(der, "\x30\x2e\x02\x01\x00\x30\x05\x06\x03\x2b\x65\x70\x04\x22\x04\x20" .. seed)
  sh(("openssl pkey -inform DER -in %s -pubout -outform DER -out %s.pub"):format(q(der), q(der)))
  local pub = assert(support.read(der .. ".pub")):sub(-32)
  local seed_raw = string.char(PREFIX.seed | (p >> 5), (p & 31) << 3) .. seed
  return { seed = base32(with_crc(seed_raw)), public = base32(with_crc(string.char(p) .. pub)), der = der }
end

local function sign(key, text)
  local msg = key.der .. ".msg"
  support.write(msg, text)
  sh(("openssl pkeyutl -sign -rawin -inkey %s -keyform DER -in %s -out %s.sig"):format(q(key.der), q(msg), q(msg)))
  return assert(support.read(msg .. ".sig"))
end

-- A JWT issued by `issuer` about `subject` (key pairs); nats is the claims'
-- "nats" object (its type and version are added).
function M.jwt(issuer, subject, nats_type, nats)
  nats = nats or {}
  nats.type = nats_type
  nats.version = 2
  local claims = { jti = base32(random_bytes(32)), iat = os.time(), iss = issuer.public,
                   name = nats_type .. "-" .. subject.public:sub(1, 6), sub = subject.public, nats = nats }
  local text = base64url(json.encode { typ = "JWT", alg = "ed25519-nkey" }) .. "." .. base64url(json.encode(claims))
  return text .. "." .. base64url(sign(issuer, text))
end

-- An account's claims with JetStream enabled and no other limit.
function M.account_claims()
  return { limits = { subs = -1, data = -1, payload = -1, imports = -1, exports = -1, wildcards = true,
                      conn = -1, leaf = -1, mem_storage = -1, disk_storage = -1, streams = -1, consumer = -1 },
           default_permissions = { pub = {}, sub = {} } }
end

function M.user_claims()
  return { pub = {}, sub = {}, subs = -1, data = -1, payload = -1 }
end

function M.creds(user_jwt, user)
  return ("-----BEGIN NATS USER JWT-----\n%s\n------END NATS USER JWT------\n\n" ..
          "************************* IMPORTANT *************************\n" ..
          "NKEY Seed printed below can be used to sign and prove identity.\n\n" ..
          "-----BEGIN USER NKEY SEED-----\n%s\n------END USER NKEY SEED------\n"):format(user_jwt, user.seed)
end

-- A nats-server configuration in operator mode: this operator (a key pair),
-- these accounts (public key -> JWT) in a memory resolver, and the system
-- account JetStream needs (made here).
function M.server_conf(operator, accounts)
  local sys = M.keypair("account")
  accounts[sys.public] = M.jwt(operator, sys, "account", { limits = { conn = -1 } })
  local lines = { ("operator: %q"):format(M.jwt(operator, operator, "operator", { system_account = sys.public })),
                  ("system_account: %s"):format(sys.public), "resolver: MEMORY", "resolver_preload: {" }
  for public, account_jwt in pairs(accounts) do lines[#lines + 1] = ("  %s: %q"):format(public, account_jwt) end
  lines[#lines + 1] = "}"
  return table.concat(lines, "\n") .. "\n"
end

function M.cleanup()
  if dir then support.rmdir(dir) end
  dir = nil
end

return M
