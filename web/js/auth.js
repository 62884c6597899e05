// Who the page acts for. The access token lives in sessionStorage only (gone when the tab is
// closed); credentials are never stored anywhere.
//
// Two ways in:
//  * Production: the page sends the user to the portal (`PORTAL_SIGNIN_URL`) with `redirect_to`
//    and a fresh random `state`, kept in this tab's sessionStorage. The portal sends the user
//    back as `/#access_token=<Supabase access token>&expires_in=<seconds>&state=<state>`. A token
//    is accepted only with the state this tab issued, once, within ten minutes: a link or a
//    navigation crafted by someone else (who cannot know the state) never signs anyone in.
//  * Embedded default: `tradeeon serve` prints `/#signin=<one-time code>`; the page trades the
//    code for a short-lived token of the one local user (`POST /ui/local-signin`) and renews it
//    while open.
// Either way the fragment is read when the page loads and removed at once. A signed-in session is
// never replaced by another account's without the user confirming it (see `main.js`).

const STORAGE_KEY = 'tradeeon.session';
/** The sign-in this tab started: `{state, startedAt}`. */
const PENDING_KEY = 'tradeeon.signin';
/** How long the portal may take to send the user back. */
const PENDING_LIFETIME_MS = 10 * 60 * 1000;
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

/** The claims of `jwt` (unverified: for display and comparison only). */
function claimsOf(jwt) {
  try {
    const payload = jwt.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    return JSON.parse(atob(payload.padEnd(Math.ceil(payload.length / 4) * 4, '=')));
  } catch {
    return null;
  }
}

/** The current token's claims (unverified: for display only). */
export function claims() {
  const t = token();
  return t ? claimsOf(t) : null;
}

/** How a session is named to its user: the email, else the user id. */
export function accountName(session) {
  const c = claimsOf(session.token);
  return c?.email || c?.sub || 'an unknown account';
}

function expiryOf(jwt, expiresIn) {
  if (Number.isFinite(expiresIn) && expiresIn > 0) return Date.now() + expiresIn * 1000;
  const exp = claimsOf(jwt)?.exp;
  // Not a JWT we can read: let the API decide.
  return Number.isFinite(exp) ? exp * 1000 : null;
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

/** Removes the fragment from the address bar and history: a token must not linger there. */
export function cleanFragment() {
  history.replaceState(history.state, '', location.pathname + location.search);
}

function randomState() {
  const bytes = crypto.getRandomValues(new Uint8Array(32));
  return btoa(String.fromCharCode(...bytes)).replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '');
}

/** Sends the user to the portal to sign in; it comes back with a token and this state. */
export function startPortalSignIn(portalUrl) {
  const state = randomState();
  sessionStorage.setItem(PENDING_KEY, JSON.stringify({ state, startedAt: Date.now() }));
  const url = new URL(portalUrl);
  url.searchParams.set('redirect_to', `${location.origin}/`);
  url.searchParams.set('state', state);
  location.assign(url.href);
}

/** Uses up the pending sign-in: true when `state` is the one this tab issued, in time. */
function answersPendingSignIn(state) {
  let pending = null;
  try {
    pending = JSON.parse(sessionStorage.getItem(PENDING_KEY) || 'null');
  } catch { /* unreadable: no pending sign-in */ }
  sessionStorage.removeItem(PENDING_KEY);
  return Boolean(
    state && pending && typeof pending.state === 'string' && pending.state === state
      && Date.now() - pending.startedAt < PENDING_LIFETIME_MS,
  );
}

/** Whether the fragment carries a sign-in of either kind. */
export function fragmentHasSignIn() {
  const fragment = new URLSearchParams(location.hash.slice(1));
  return fragment.has('access_token') || fragment.has('signin');
}

/**
 * Reads the sign-in fragment, if any, and removes it from the address bar. Returns
 * `{error}` (a message to show), `{session}` (a new session to take: the caller decides, see
 * `replaces`) or `{}` when there was nothing to read.
 */
export async function consumeFragment() {
  const fragment = new URLSearchParams(location.hash.slice(1));
  if (fragment.has('access_token')) {
    const jwt = fragment.get('access_token');
    const started = answersPendingSignIn(fragment.get('state'));
    cleanFragment();
    if (!started) {
      return { error: 'That sign-in link was not started from this page, so it was ignored. Sign in here instead.' };
    }
    return { session: { token: jwt, expiresAt: expiryOf(jwt, Number(fragment.get('expires_in'))), local: false } };
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
      return { error: 'Could not reach the service to sign in. Is tradeeon serve running?' };
    }
    const body = await response.json().catch(() => null);
    if (!response.ok) {
      return { error: body?.error?.message || 'This sign-in link did not work.' };
    }
    return { session: { token: body.access_token, expiresAt: Date.now() + body.expires_in * 1000, local: true } };
  }
  return {};
}

/** The signed-in session that `session` would replace, if it is another account's. */
export function replaces(session) {
  const current = read();
  if (!current) return null;
  const same = claimsOf(current.token)?.sub === claimsOf(session.token)?.sub;
  return same ? null : current;
}

/** Makes `session` the page's session. */
export function accept(session) {
  write(session);
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
