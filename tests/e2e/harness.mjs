// Test harness: starts `tradeeon serve --simulate` on loopback (free ports, a temporary data
// directory, SQLite), reads what it prints (its address, one-time sign-in links, the simulator's
// seeded keys), launches Debian's chromium through playwright-core, and stops everything at the
// end — also when a test fails or the runner is interrupted.

import { spawn } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const here = path.dirname(fileURLToPath(import.meta.url));
export const REPO = path.resolve(here, '..', '..');
export const OUTPUT = path.join(REPO, 'test-output', 'e2e');
const BINARY = process.env.TRADEEON_BIN || path.join(REPO, 'target', 'debug', 'tradeeon');
const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
/** The egress addresses the security panel should list (documentation ranges, RFC 5737). */
export const EGRESS_IPS = ['203.0.113.10', '198.51.100.7'];

/** Variables of the developer's environment that must not leak into the server. */
const SERVER_VARIABLES = [
  'DATABASE_URL', 'DATABASE_MAX_CONNECTIONS', 'MIGRATE_ON_START', 'ENCRYPTION_KEY', 'SUPABASE_URL',
  'SUPABASE_JWT_SECRET', 'JWT_AUDIENCE', 'PORTAL_SIGNIN_URL', 'API_HOST', 'API_PORT', 'API_METRICS_PORT', 'CORS_ORIGINS', 'TRUST_PROXY', 'LOG_FORMAT',
  'EGRESS_IPS', 'HEALTH_SWEEP_INTERVAL', 'METRICS_PUBLISHER', 'API_USER_RATE_LIMIT_PER_MINUTE', 'RUST_LOG',
  'KITE_LOGIN_URL', 'AWS_ENDPOINT_URL', 'AWS_REGION', 'AWS_DEFAULT_REGION',
];

const running = new Set();
function killAll() {
  for (const child of running) {
    try { child.kill('SIGKILL'); } catch { /* already gone */ }
  }
}
process.on('exit', killAll);
for (const signal of ['SIGINT', 'SIGTERM']) {
  process.on(signal, () => { killAll(); process.exit(130); });
}

const stripAnsi = (text) => text.replace(/\x1b\[[0-9;]*m/g, '');

/** Waits for `predicate()` to be truthy, polling; throws after `timeout` ms. */
export async function until(predicate, { timeout = 30_000, interval = 100, what = 'condition' } = {}) {
  const deadline = Date.now() + timeout;
  for (;;) {
    const value = await predicate();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeout} ms waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, interval));
  }
}

/**
 * Starts the server. `name` labels its log file in test-output/e2e/; `settings` are extra
 * environment variables. Without `SUPABASE_JWT_SECRET` it signs in through its one-time links.
 * Returns `{base, keys, nextSignInLink(), log(), stop()}`.
 */
export async function startServer(name, settings = {}) {
  if (!fs.existsSync(BINARY)) throw new Error(`${BINARY} does not exist: run cargo build first`);
  fs.mkdirSync(OUTPUT, { recursive: true });
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tradeeon-e2e-'));
  const env = { ...process.env };
  for (const variable of SERVER_VARIABLES) delete env[variable];
  Object.assign(env, {
    DATABASE_URL: `sqlite://${path.join(dir, 'data', 'tradeeon.db')}`,
    API_HOST: '127.0.0.1',
    API_PORT: '0',
    API_METRICS_PORT: '0',
    EGRESS_IPS: EGRESS_IPS.join(','),
    METRICS_PUBLISHER: 'none',
    // Sweeps would add health checks (and audit rows) at moments the tests do not control.
    HEALTH_SWEEP_INTERVAL: '1h',
    RUST_LOG: 'info',
    NO_COLOR: '1',
  }, settings);
  const localSignIn = !settings.SUPABASE_JWT_SECRET;
  const child = spawn(BINARY, ['serve', '--simulate'], { cwd: dir, env, stdio: ['ignore', 'pipe', 'pipe'] });
  running.add(child);
  let output = '';
  let exited = null;
  const codes = [];
  const usedCodes = new Set();
  const collect = (chunk) => {
    output += stripAnsi(chunk.toString());
    for (const match of output.matchAll(/#signin=([A-Za-z0-9_-]+)/g)) {
      if (!codes.includes(match[1])) codes.push(match[1]);
    }
  };
  child.stdout.on('data', collect);
  child.stderr.on('data', collect);
  child.on('exit', (code, signal) => { exited = { code, signal }; running.delete(child); });

  const server = {
    dir,
    base: null,
    keys: null,
    log: () => output,
    /** The newest sign-in link nobody used yet (waits for the server to print it). */
    async nextSignInLink() {
      const code = await until(() => codes.find((c) => !usedCodes.has(c)), { timeout: 15_000, what: 'a sign-in link' });
      usedCodes.add(code);
      return `${server.base}/#signin=${code}`;
    },
    async stop() {
      if (!exited) {
        child.kill('SIGTERM');
        const stopped = await until(() => exited, { timeout: 15_000, what: 'the server to stop' }).catch(() => null);
        if (!stopped) child.kill('SIGKILL');
      }
      fs.writeFileSync(path.join(OUTPUT, `${name}-server.log`), output);
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
  try {
    const base = await until(() => {
      if (exited) throw new Error(`tradeeon serve exited early (${JSON.stringify(exited)}):\n${output}`);
      return output.match(/API listening on (http:\/\/127\.0\.0\.1:\d+)/)?.[1];
    }, { timeout: 60_000, what: 'tradeeon serve to listen' });
    server.base = base;
    if (localSignIn) await until(() => codes.length > 0, { timeout: 10_000, what: 'the first sign-in link' });
    server.keys = parseSeededKeys(output);
  } catch (error) {
    await server.stop();
    throw error;
  }
  return server;
}

function section(text, start, end) {
  const from = text.indexOf(start);
  if (from < 0) throw new Error(`no "${start}" in the server output`);
  const to = end ? text.indexOf(end, from) : -1;
  return text.slice(from, to < 0 ? undefined : to);
}

function rows(block) {
  const out = {};
  for (const m of block.matchAll(/^ {2}(\S.*)\n {4}key:\s+(\S+)\n {4}secret:\s+(\S+)/gm)) {
    out[m[1].trim()] = { key: m[2], secret: m[3] };
  }
  return out;
}

/** The simulator's seeded keys, as `tradeeon serve --simulate` prints them. */
export function parseSeededKeys(text) {
  const binance = rows(section(text, 'Binance (API key / secret):', 'Coinbase Advanced Trade'));
  const kraken = rows(section(text, 'Kraken (API key / private key):', 'Zerodha Kite Connect'));
  const coinbase = section(text, 'Coinbase Advanced Trade', 'Kraken (API key');
  const es256 = coinbase.match(/ES256 key[^\n]*\n\s+key name: (\S+)\n\s+private key:\n((?:[ \t]+[^\n]*\n)*?[ \t]+-----END EC PRIVATE KEY-----)/);
  const zerodha = section(text, 'Zerodha Kite Connect', '\n\n');
  const keys = {
    binance: {
      full: binance['read + trade, no IP restriction'],
      localOnly: binance['read + trade, 127.0.0.1 only'],
      revoked: binance['revoked (-2015)'],
    },
    coinbase: {
      keyName: es256?.[1],
      privateKey: es256?.[2].split('\n').map((line) => line.trim()).join('\n'),
    },
    kraken: {
      full: kraken['query + trade, no IP restriction'],
      otp: { ...kraken['query + trade, 127.0.0.1 only, two-factor password below'], passphrase: text.match(/two-factor password \(otp\) of the 2FA key: (\S+)/)?.[1] },
    },
    zerodha: {
      apiKey: zerodha.match(/api_key:\s+(\S+)/)?.[1],
      apiSecret: zerodha.match(/api_secret:\s+(\S+)/)?.[1],
    },
  };
  const missing = [];
  const walk = (obj, at) => {
    for (const [k, v] of Object.entries(obj)) {
      if (v && typeof v === 'object') walk(v, `${at}.${k}`);
      else if (!v) missing.push(`${at}.${k}`);
    }
  };
  walk(keys, 'keys');
  if (missing.length) throw new Error(`could not read the seeded keys (${missing.join(', ')}) from:\n${text}`);
  return keys;
}

export async function launchBrowser() {
  return chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-dev-shm-usage'],
    timeout: 60_000,
  });
}

/** Screenshots numbered in the order they were taken, per test file. */
export function screenshots(prefix) {
  let n = 0;
  return async (page, name, options = {}) => {
    n += 1;
    const file = path.join(OUTPUT, `${prefix}-${String(n).padStart(2, '0')}-${name}.png`);
    // With a modal open, the viewport is what a person sees (the backdrop covers only it).
    const modal = await page.locator('dialog[open]').count() > 0;
    await page.screenshot({ path: file, fullPage: !modal, ...options });
    return file;
  };
}

/** A Supabase-style HS256 access token for `user` (`{id, email}`), signed with `secret`. */
export function accessToken(secret, user, lifetimeSeconds = 3600) {
  const now = Math.floor(Date.now() / 1000);
  const encode = (value) => Buffer.from(JSON.stringify(value)).toString('base64url');
  const unsigned = `${encode({ alg: 'HS256', typ: 'JWT' })}.${encode({
    sub: user.id, email: user.email, aud: 'authenticated', role: 'authenticated', iat: now, exp: now + lifetimeSeconds,
  })}`;
  return `${unsigned}.${crypto.createHmac('sha256', secret).update(unsigned).digest('base64url')}`;
}

/**
 * A small web server on a loopback port of its own (so another origin than the service's).
 * `handle(request, response, url)` answers. Returns `{base, close()}`.
 */
export async function startSite(handle) {
  const site = http.createServer((request, response) => handle(request, response, new URL(request.url, 'http://x')));
  await new Promise((resolve) => site.listen(0, '127.0.0.1', resolve));
  return {
    base: `http://127.0.0.1:${site.address().port}`,
    close: () => new Promise((resolve) => { site.closeAllConnections(); site.close(resolve); }),
  };
}

/** Signs a page in through a one-time link and returns the API token it was given. */
export async function signIn(page, server) {
  await page.goto(await server.nextSignInLink());
  await page.locator('#app').waitFor({ state: 'visible' });
  return page.evaluate(() => JSON.parse(sessionStorage.getItem('tradeeon.session')).token);
}

/** Calls the API the way the page does (for checks the UI does not show). */
export async function api(server, token, method, pathname, body) {
  const response = await fetch(`${server.base}${pathname}`, {
    method,
    headers: { Authorization: `Bearer ${token}`, ...(body ? { 'Content-Type': 'application/json' } : {}) },
    body: body ? JSON.stringify(body) : undefined,
  });
  const text = await response.text();
  return { status: response.status, headers: response.headers, body: text ? JSON.parse(text) : null };
}

/** Fails the test on any console error or uncaught exception in the page. */
export function watchPage(page, problems) {
  page.on('pageerror', (error) => problems.push(`page error: ${error.message}`));
  page.on('console', (message) => {
    if (message.type() === 'error' && !/status of (401|404|409|422|400)/.test(message.text())) {
      problems.push(`console error: ${message.text()}`);
    }
  });
}
