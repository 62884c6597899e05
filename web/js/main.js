// Entry point: sign-in, then the Connections page, the security panel and the audit log.

import * as auth from './auth.js';
import * as api from './api.js';
import * as connections from './connections.js';
import { $, sleep } from './dom.js';
import * as modals from './modals.js';
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
  try {
    const config = await (await fetch('/ui/config', { cache: 'no-store' })).json();
    $('#signin-local').hidden = !config.local_sign_in;
  } catch {
    $('#signin-local').hidden = true;
  }
  $('#signin-title').setAttribute('tabindex', '-1');
  $('#signin-title').focus();
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
  const signInError = await auth.consumeFragment();
  // Kite's redirect back: take its parameters and drop them from the address bar at once (the
  // request token is single-use, but it need not linger in the history either).
  let kiteCallback = null;
  if (location.pathname === '/kite/callback') {
    kiteCallback = Object.fromEntries(new URLSearchParams(location.search));
    history.replaceState(null, '', '/');
  }
  if (!auth.token()) {
    await showSignIn(signInError || (kiteCallback ? 'Sign in first, then log in to Kite again.' : ''));
    return;
  }
  auth.start();
  await showApp(kiteCallback);
}

// A sign-in link opened in a tab that already shows the page only changes the fragment.
window.addEventListener('hashchange', async () => {
  const fragment = new URLSearchParams(location.hash.slice(1));
  if (!fragment.has('signin') && !fragment.has('access_token')) return;
  const error = await auth.consumeFragment();
  if (auth.token() && !error) {
    auth.start();
    await showApp(null);
  } else {
    await showSignIn(error);
  }
});

window.addEventListener('unhandledrejection', (event) => {
  if (event.reason instanceof api.ApiError && event.reason.status === 401) return;
  if (event.reason?.name === 'AbortError') return;
  showNotice(`Something went wrong: ${event.reason?.message ?? event.reason}`);
});

boot();
