// Who the page acts for. The access token lives in sessionStorage only (gone when the tab is
// closed); credentials are never stored anywhere.
//
// Two ways in:
//  * Production: the Tradeeon portal opens this page as `/#access_token=<Supabase access token>`
//    (optionally `&expires_in=<seconds>`), the same fragment shape Supabase's own redirects use.
//    A fragment never reaches a server or a Referer header; the page removes it at once.
//  * Embedded default: `tradeeon serve` prints `/#signin=<one-time code>`; the page trades the
//    code for a short-lived local token (`POST /ui/local-signin`) and renews it while open.

const STORAGE_KEY = 'tradeeon.session';
/** Renew a local token this long before it expires. */
const RENEW_BEFORE_MS = 5 * 60 * 1000;

let renewTimer = null;
const listeners = new Set();

function read() {
  try {
    const session = JSON.parse(sessionStorage.getItem(STORAGE_KEY) || 'null');
    if (!session || typeof session.token !== 'string') return null;
    if (session.expiresAt && session.expiresAt <= Date.now()) {
      sessionStorage.removeItem(STORAGE_KEY);
      return null;
    }
    return session;
  } catch {
    return null;
  }
}

function write(session) {
  sessionStorage.setItem(STORAGE_KEY, JSON.stringify(session));
  scheduleRenewal();
}

export function token() {
  return read()?.token ?? null;
}

/** The token's claims (unverified: for display only). */
export function claims() {
  const t = token();
  if (!t) return null;
  try {
    const payload = t.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    return JSON.parse(atob(payload.padEnd(Math.ceil(payload.length / 4) * 4, '=')));
  } catch {
    return null;
  }
}

function expiryOf(jwt, expiresIn) {
  if (Number.isFinite(expiresIn) && expiresIn > 0) return Date.now() + expiresIn * 1000;
  try {
    const payload = JSON.parse(atob(jwt.split('.')[1].replace(/-/g, '+').replace(/_/g, '/')));
    if (Number.isFinite(payload.exp)) return payload.exp * 1000;
  } catch { /* not a JWT we can read: let the API decide */ }
  return null;
}

export function signOut(reason = '') {
  sessionStorage.removeItem(STORAGE_KEY);
  clearTimeout(renewTimer);
  for (const listener of listeners) listener({ signedIn: false, reason });
}

/** Called by the API client on a 401: the token is gone or expired. */
export function rejected(message) {
  if (read()) signOut(message || 'Your session has ended. Sign in again.');
}

export function onChange(listener) {
  listeners.add(listener);
}

function cleanFragment() {
  history.replaceState(history.state, '', location.pathname + location.search);
}

/**
 * Reads a sign-in fragment, if any. Returns an error message to show, or ''.
 */
export async function consumeFragment() {
  const fragment = new URLSearchParams(location.hash.slice(1));
  if (fragment.has('access_token')) {
    const jwt = fragment.get('access_token');
    cleanFragment();
    write({ token: jwt, expiresAt: expiryOf(jwt, Number(fragment.get('expires_in'))), local: false });
    return '';
  }
  if (fragment.has('signin')) {
    const code = fragment.get('signin');
    cleanFragment();
    let response;
    try {
      response = await fetch('/ui/local-signin', {
        method: 'POST',
        headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify({ code }),
      });
    } catch {
      return 'Could not reach the service to sign in. Is tradeeon serve running?';
    }
    const body = await response.json().catch(() => null);
    if (!response.ok) {
      return body?.error?.message || 'This sign-in link did not work.';
    }
    write({ token: body.access_token, expiresAt: Date.now() + body.expires_in * 1000, local: true });
    return '';
  }
  return '';
}

function scheduleRenewal() {
  clearTimeout(renewTimer);
  const session = read();
  if (!session?.local || !session.expiresAt) return;
  const wait = Math.max(5_000, session.expiresAt - Date.now() - RENEW_BEFORE_MS);
  renewTimer = setTimeout(renew, wait);
}

async function renew() {
  const session = read();
  if (!session?.local) return;
  try {
    const response = await fetch('/ui/local-signin/renew', {
      method: 'POST',
      headers: { Authorization: `Bearer ${session.token}` },
    });
    if (response.ok) {
      const body = await response.json();
      write({ token: body.access_token, expiresAt: Date.now() + body.expires_in * 1000, local: true });
      return;
    }
    if (response.status === 401) {
      rejected('Your local session has ended. Open the newest sign-in link printed by tradeeon serve.');
      return;
    }
  } catch { /* offline for a moment: try again shortly */ }
  renewTimer = setTimeout(renew, 30_000);
}

export function start() {
  scheduleRenewal();
}
