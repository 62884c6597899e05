// Entry point: sign-in, then the Connections page, the security panel and the audit log.

import * as auth from './auth.js';
import * as api from './api.js';
import * as connections from './connections.js';
import { button, openDialog } from './dialog.js';
import { $, h, sleep } from './dom.js';
import * as modals from './modals.js';
import * as healthHistory from './history.js';
import * as security from './security.js';
import * as wizard from './wizard.js';

let started = false;

function showNotice(message) {
  const notice = $('#notice');
  notice.textContent = message;
  notice.hidden = !message;
}

async function showSignIn(message = '') {
  connections.stopPolling();
  for (const dialog of document.querySelectorAll('dialog[open]')) dialog.close();
  $('#app').hidden = true;
  $('#topnav').hidden = true;
  $('#account').hidden = true;
  $('#signin').hidden = false;
  $('#signin-message').textContent = message;
  document.title = 'Sign in · Tradeeon Connect';
  let config = {};
  try {
    config = await (await fetch('/ui/config', { cache: 'no-store' })).json();
  } catch { /* the service is not answering: say nothing about how to sign in */ }
  $('#signin-local').hidden = !config.local_sign_in;
  $('#signin-portal').hidden = !config.portal_signin_url;
  $('#signin-unavailable').hidden = Boolean(config.local_sign_in || config.portal_signin_url);
  $('#signin-portal-button').onclick = () => auth.startPortalSignIn(config.portal_signin_url);
  $('#signin-title').setAttribute('tabindex', '-1');
  $('#signin-title').focus();
}

/** Asks whether to replace the signed-in account `current` by `next`; true to switch. */
function confirmSwitch(current, next) {
  return new Promise((resolve) => {
    let answer = false;
    const dialog = openDialog({ title: 'Switch accounts?', className: 'switch-account', onClose: () => resolve(answer) });
    dialog.body.append(
      h('p', {}, 'You are signed in as ', h('strong', { text: current }), '. This sign-in is for ',
        h('strong', { text: next }), '.'),
      h('p', { text: `Exchange keys you add after switching are saved to ${next}.` }),
    );
    const stay = button(`Stay signed in as ${current}`, { kind: 'primary', onclick: () => dialog.close() });
    const change = button(`Switch to ${next}`, { onclick: () => { answer = true; dialog.close(); } });
    dialog.footer.append(change, stay);
    stay.focus();
  });
}

/**
 * Takes the sign-in the fragment carries, if any. A session of another account than the one
 * signed in replaces it only when the user says so. Returns an error message to show, or ''.
 */
async function signInFromFragment() {
  const { error, session } = await auth.consumeFragment();
  if (!session) return error ?? '';
  const current = auth.replaces(session);
  if (current && !(await confirmSwitch(auth.accountName(current), auth.accountName(session)))) {
    return `You are still signed in as ${auth.accountName(current)}.`;
  }
  auth.accept(session);
  return '';
}

/** Loads the exchange catalog, retrying while the service starts. */
async function loadCatalog() {
  for (let attempt = 0; ; attempt += 1) {
    try {
      return await connections.loadCatalog();
    } catch (error) {
      if (error.status === 401 || attempt >= 5) throw error;
      await sleep(1000 * (attempt + 1));
    }
  }
}

async function showApp(kiteCallback) {
  $('#signin').hidden = true;
  $('#app').hidden = false;
  $('#topnav').hidden = false;
  $('#account').hidden = false;
  document.title = 'Exchange connections · Tradeeon Connect';
  const claims = auth.claims();
  $('#account-email').textContent = claims?.email ?? 'Signed in';

  try {
    await loadCatalog();
  } catch (error) {
    if (error.status !== 401) showNotice(`Could not load the list of exchanges: ${error.message}`);
    return;
  }
  if (!started) {
    started = true;
    wire();
  }
  connections.startPolling();
  security.loadEgress().catch((error) => showNotice(`Could not load the egress addresses: ${error.message}`));
  security.refreshAudit().catch(() => {});
  if (kiteCallback) {
    // Wait for the first list so the wizard knows the connections.
    await connections.refresh().catch(() => {});
    wizard.openWizard({ kiteCallback });
  }
}

function wire() {
  const changed = () => security.refreshAudit().catch(() => {});
  wizard.onConnectionChange(changed);
  modals.onConnectionChange(changed);
  connections.setActions({
    test: (c) => modals.openTest(c),
    rotate: (c) => modals.openRotate(c),
    revoke: (c) => modals.openRevoke(c),
    reconnect: () => wizard.openWizard({ exchange: 'zerodha' }),
    history: (c) => healthHistory.openHistory(c),
  });
  connections.onRefresh((list, changes, previous) => {
    if (changes.length || list.length !== previous.size) changed();
  });
  $('#connect-button').addEventListener('click', () => wizard.openWizard());
  $('#empty-connect-button').addEventListener('click', () => wizard.openWizard({ returnFocus: $('#connect-button') }));
  security.initAudit();
}

async function boot() {
  $('#sign-out').addEventListener('click', () => auth.signOut('You signed out.'));
  auth.onChange(({ signedIn, reason }) => {
    if (!signedIn) showSignIn(reason);
  });
  const signInMessage = await signInFromFragment();
  // Kite's redirect back: take its parameters and drop them from the address bar at once (the
  // request token is single-use, but it need not linger in the history either).
  let kiteCallback = null;
  if (location.pathname === '/kite/callback') {
    kiteCallback = Object.fromEntries(new URLSearchParams(location.search));
    history.replaceState(null, '', '/');
  }
  if (!auth.token()) {
    await showSignIn(signInMessage || (kiteCallback ? 'Sign in first, then log in to Kite again.' : ''));
    return;
  }
  showNotice(signInMessage);
  auth.start();
  await showApp(kiteCallback);
}

// A fragment that changes after load never carries a token in: the page did not navigate, so
// whoever changed it (another page holding this window, a crafted link) is not the sign-in this
// page started. The embedded default's one-time links are the exception: they can only sign in
// the one local user, and opening a new link in the same tab should work.
window.addEventListener('hashchange', async () => {
  if (!auth.fragmentHasSignIn()) return;
  if (new URLSearchParams(location.hash.slice(1)).has('access_token')) {
    auth.cleanFragment();
    showNotice('A sign-in link was opened in this tab after it loaded and was ignored.');
    return;
  }
  const signedIn = Boolean(auth.token());
  const message = await signInFromFragment();
  if (!auth.token()) {
    await showSignIn(message);
  } else if (signedIn) {
    showNotice(message);
  } else {
    showNotice('');
    auth.start();
    await showApp(null);
  }
});

window.addEventListener('unhandledrejection', (event) => {
  if (event.reason instanceof api.ApiError && event.reason.status === 401) return;
  if (event.reason?.name === 'AbortError') return;
  showNotice(`Something went wrong: ${event.reason?.message ?? event.reason}`);
});

boot();
