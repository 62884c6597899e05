-- Tradeeon Connect: the last Kraken nonce handed out per API key, shared by every worker process.
--
-- Kraken rejects a nonce that is not larger than every nonce it accepted for the key before.
-- Workers allocate nonces under a session advisory lock per key (held until the response is in,
-- so requests with one key go one at a time across processes) with
--   last_nonce = GREATEST(last_nonce + 1, <now in microseconds>)
-- so nonces keep increasing even when the hosts' clocks disagree or step backwards.
-- Keys are identified by a non-reversible fingerprint (16 hex characters of SHA-256), never the key.
CREATE TABLE IF NOT EXISTS public.kraken_nonces (
    key_fingerprint TEXT PRIMARY KEY,
    last_nonce      BIGINT NOT NULL
);

-- Only the service uses it; no policy, so users (role authenticated) see no rows.
GRANT SELECT, INSERT, UPDATE, DELETE ON public.kraken_nonces TO service_role;
ALTER TABLE public.kraken_nonces ENABLE ROW LEVEL SECURITY;
