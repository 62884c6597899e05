// The connect wizard, in four steps as the portal's drawer: choose the exchange → credentials →
// test → review & confirm.
//
// API-key exchanges: the test is `POST /connections/test` (nothing stored), the confirm is
// `POST /connections` (saved encrypted, status `pending`, a `verify` job queued).
// Zerodha: step 2 is "Log in with Kite" (`POST /connections/zerodha/login` stores the app's
// credentials and returns Kite's login URL); Kite redirects back to `/kite/callback` with
// `request_token` and `state`, which the page posts to `POST /connections/zerodha/session`; step 3
// follows the `kite_session` job and step 4 confirms.

import * as api from './api.js';
import * as connections from './connections.js';
import { credentialForm } from './credentials.js';
import { button, openDialog } from './dialog.js';
import { h, replaceChildren, toast } from './dom.js';
import { followJob } from './jobs.js';
import { exchangeLogo, exchangeName, permissionChips, warningText } from './labels.js';

const STEPS = ['Exchange', 'Credentials', 'Test', 'Review & confirm'];
const KITE_PENDING_KEY = 'tradeeon.kite-login';

let afterChange = () => {};

/** `fn()` runs after a connection was saved (the page refreshes the audit log). */
export function onConnectionChange(fn) {
  afterChange = fn;
}

/** Where Kite should send the user back: this page's callback route. */
export function kiteRedirectUrl() {
  return `${location.origin}/kite/callback`;
}

/**
 * Opens the wizard. `exchange`: preselect and start at the credentials step. `kiteCallback`:
 * `{request_token, state, status}` from Kite's redirect — start at the test step.
 */
export function openWizard({ exchange = null, kiteCallback = null, returnFocus = null } = {}) {
  const wizard = {
    step: 1,
    exchange: exchange ? connections.state.catalog.get(exchange) : null,
    form: null,
    nickname: '',
    testResult: null,
    abort: null,
  };
  const dialog = openDialog({
    title: 'Connect an exchange',
    className: 'drawer wizard',
    returnFocus: returnFocus ?? document.getElementById('connect-button'),
    onClose() {
      wizard.abort?.abort();
      wizard.form?.clear();
    },
  });
  dialog.dialog.dataset.testid = 'wizard';
  const stepList = h('ol', { class: 'steps', 'aria-label': 'Steps' });
  const content = h('div', { class: 'step-content' });
  dialog.body.append(stepList, content);

  function renderSteps() {
    replaceChildren(stepList, STEPS.map((label, index) => {
      const n = index + 1;
      const stepLabel = n === 3 && wizard.exchange?.id === 'zerodha' ? 'Log in & test' : label;
      return h('li', {
        class: n < wizard.step ? 'done' : '',
        'aria-current': n === wizard.step ? 'step' : null,
      }, h('span', { class: 'step-label' }, h('span', { class: 'visually-hidden', text: `Step ${n}: ` }), stepLabel,
        n < wizard.step ? h('span', { class: 'visually-hidden', text: ' (done)' }) : null));
    }));
  }

  function heading(text) {
    return h('h3', { class: 'step-title', tabindex: '-1', text });
  }

  function setFooter(...buttons) {
    replaceChildren(dialog.footer, buttons);
  }

  function show(step, ...nodes) {
    wizard.abort?.abort();
    wizard.abort = null;
    wizard.step = step;
    dialog.dialog.dataset.step = String(step);
    renderSteps();
    replaceChildren(content, nodes);
    // Focus the step's heading so screen readers announce the new step.
    content.querySelector('.step-title')?.focus();
  }

  // ---- Step 1: exchange --------------------------------------------------------------------
  function stepExchange() {
    const error = h('p', { class: 'field-error', id: 'exchange-choice-error', hidden: true });
    const options = [...connections.state.catalog.values()].map((info) => {
      const existing = connections.byExchange(info.id);
      const note = info.connect_flow === 'oauth' ? 'Kite Connect app: log in with Kite' : 'API key and secret';
      return h('label', { class: 'exchange-option', dataset: { exchange: info.id } },
        h('input', { type: 'radio', name: 'exchange', value: info.id, checked: wizard.exchange?.id === info.id }),
        exchangeLogo(info.id),
        h('span', { class: 'option-text' },
          h('span', { class: 'option-name', text: exchangeName(info.id, connections.state.catalog) }),
          h('span', { class: 'option-note', text: existing ? `${note} · already connected: new keys replace the saved ones` : note })));
    });
    const fieldset = h('fieldset', { class: 'exchange-options', 'aria-describedby': 'exchange-choice-error' },
      h('legend', { text: 'Which exchange do you want to connect?' }), options);
    const form = h('form', { novalidate: true, onsubmit: (e) => { e.preventDefault(); next(); } }, fieldset, error);
    function next() {
      const chosen = form.querySelector('input[name="exchange"]:checked');
      if (!chosen) {
        error.textContent = 'Choose an exchange.';
        error.hidden = false;
        form.querySelector('input[name="exchange"]').focus();
        return;
      }
      const info = connections.state.catalog.get(chosen.value);
      if (wizard.exchange?.id !== info.id) {
        wizard.form?.clear();
        wizard.form = null;
      }
      wizard.exchange = info;
      stepCredentials();
    }
    show(1, heading('Choose the exchange'), form);
    setFooter(
      button('Cancel', { onclick: () => dialog.close() }),
      h('span', { class: 'spacer' }),
      button('Next', { kind: 'primary', onclick: next, 'data-action': 'next' }),
    );
  }

  // ---- Step 2: credentials -----------------------------------------------------------------
  function stepCredentials(errorToShow = null) {
    const info = wizard.exchange;
    const name = exchangeName(info.id, connections.state.catalog);
    const kite = info.connect_flow === 'oauth';
    wizard.form ??= credentialForm(info, { nickname: !kite, nicknameValue: wizard.nickname });
    const docs = h('p', { class: 'hint' }, 'How to create a key: ',
      h('a', { href: info.docs_url, target: '_blank', rel: 'noopener noreferrer' }, `${name} documentation`,
        h('span', { class: 'visually-hidden', text: ' (opens in a new tab)' })), '.');
    const intro = kite
      ? h('div', { class: 'callout' },
        h('p', { text: 'Zerodha connects through a Kite login: enter your Kite Connect app\'s key and secret, then log in on Kite. Kite sends you back here and the session is checked.' }),
        h('p', {}, 'Register this redirect URL for your app on the Kite developer console: ', h('code', { text: kiteRedirectUrl() })))
      : h('div', { class: 'callout' },
        'Use a key with ', h('strong', { text: 'read' }), ' permission (and trade only if you trade through Tradeeon). ',
        h('strong', { text: 'Never enable withdrawals.' }), ' The key is tested before anything is saved.');
    const submit = kite ? startKiteLogin : runTest;
    const form = h('form', { novalidate: true, onsubmit: (e) => { e.preventDefault(); submit(); } },
      wizard.form.element, h('button', { type: 'submit', hidden: true, tabindex: '-1' }));
    show(2, heading(`${name}: ${kite ? 'Kite Connect app' : 'API key'}`), intro, docs, form);
    setFooter(
      button('Back', { onclick: () => { wizard.nickname = wizard.form.values().nickname ?? ''; stepExchange(); } }),
      h('span', { class: 'spacer' }),
      kite
        ? button('Log in with Kite', { kind: 'primary', onclick: startKiteLogin, 'data-action': 'kite-login' })
        : button('Test connection', { kind: 'primary', onclick: runTest, 'data-action': 'test' }),
    );
    if (errorToShow) wizard.form.showError(errorToShow);
  }

  async function withBusy(buttonEl, work) {
    dialog.setBusy(true);
    const buttons = [...dialog.footer.querySelectorAll('button')];
    buttons.forEach((b) => { b.disabled = true; });
    try {
      return await work();
    } finally {
      dialog.setBusy(false);
      buttons.forEach((b) => { if (b.isConnected) b.disabled = false; });
    }
  }

  async function runTest() {
    if (!wizard.form.validate()) return;
    const body = { exchange: wizard.exchange.id, ...wizard.form.values() };
    wizard.nickname = body.nickname ?? '';
    let accepted;
    try {
      accepted = await withBusy(null, () => api.post('/connections/test', body));
    } catch (error) {
      wizard.form.showError(error);
      return;
    }
    stepTest(accepted.job);
  }

  async function startKiteLogin() {
    if (!wizard.form.validate()) return;
    let login;
    try {
      login = await withBusy(null, () => api.post('/connections/zerodha/login', wizard.form.values()));
    } catch (error) {
      wizard.form.showError(error);
      return;
    }
    wizard.form.clear();
    // Only a marker that a login is under way (no secret): the callback reopens the wizard.
    sessionStorage.setItem(KITE_PENDING_KEY, String(Date.now()));
    const url = new URL(login.login_url);
    // Kite itself redirects to the URL registered for the app; the simulator (and the
    // registered-URL-less test setup) honours this parameter instead.
    url.searchParams.set('redirect_url', kiteRedirectUrl());
    dialog.setBusy(true);
    replaceChildren(content, heading('Opening Kite…'), h('p', { role: 'status', text: 'Sending you to Kite to log in.' }));
    location.assign(url.toString());
  }

  // ---- Step 3: test ------------------------------------------------------------------------
  function stepTest(job) {
    const info = wizard.exchange;
    const name = exchangeName(info.id, connections.state.catalog);
    const kite = info.connect_flow === 'oauth';
    const box = h('div', { class: 'test-box' });
    show(3, heading(kite ? 'Checking the Kite session' : `Testing the key with ${name}`),
      h('p', { class: 'hint', text: kite
        ? 'A worker exchanges Kite\'s request token for a session and reads your profile.'
        : 'A worker signs a read-only request with the key, from our egress IP. Nothing is saved yet.' }),
      box);
    const nextButton = button(kite ? 'Next' : 'Review', { kind: 'primary', disabled: true, 'data-action': 'review' });
    const backButton = button(kite ? 'Start again' : 'Back', { onclick: () => stepCredentials() });
    setFooter(backButton, h('span', { class: 'spacer' }), nextButton);
    wizard.abort = new AbortController();
    followJob(box, job, {
      what: kite ? 'Creating the Kite session' : `Checking with ${name}`,
      signal: wizard.abort.signal,
      okTitle: kite ? 'Logged in to Kite' : 'The key works',
      failTitle: kite ? 'The Kite login did not work' : 'The key did not work',
      exchange: name,
    }).then((finished) => {
      const ok = finished.status === 'done' && finished.result?.ok;
      wizard.testResult = finished.result;
      if (ok) {
        nextButton.disabled = false;
        nextButton.onclick = () => (kite ? stepKiteDone(finished) : stepReview());
        nextButton.focus();
        if (kite) {
          afterChange();
          connections.pollFast();
        }
      } else {
        backButton.textContent = kite ? 'Start again' : 'Back to credentials';
        backButton.focus();
      }
    }).catch((error) => {
      if (error.name === 'AbortError') return;
      box.append(h('div', { class: 'result result-fail', role: 'alert' }, h('p', { text: error.message })));
    });
  }

  // ---- Step 4: review & confirm ------------------------------------------------------------
  function stepReview() {
    const info = wizard.exchange;
    const name = exchangeName(info.id, connections.state.catalog);
    const values = wizard.form.values();
    const key = values.api_key?.trim() ?? '';
    const hint = key.length > 4 ? `…${key.slice(-4)}` : '…';
    const result = wizard.testResult;
    const error = h('div', { class: 'form-error', role: 'alert', hidden: true, tabindex: '-1' });
    const existing = connections.byExchange(info.id);
    show(4, heading('Review and confirm'),
      error,
      h('dl', { class: 'summary' },
        h('dt', { text: 'Exchange' }), h('dd', { text: name }),
        h('dt', { text: 'Nickname' }), h('dd', { text: values.nickname || '—' }),
        h('dt', { text: 'API key' }), h('dd', { text: hint }),
        h('dt', { text: 'Test' }), h('dd', { text: `Passed in ${result?.latency_ms ?? '?'} ms` })),
      h('h4', { text: 'Permissions' }),
      permissionChips(result?.permissions ?? null),
      result?.warnings?.length
        ? h('ul', { class: 'warnings', 'aria-label': 'Warnings' }, result.warnings.map((w) => h('li', { text: `⚠ ${warningText(w)}` })))
        : null,
      h('p', { class: 'callout' }, existing
        ? `You already have a ${name} connection: saving replaces its keys with these. `
        : '',
      'The keys are encrypted before they are stored and are never shown again. A worker checks them once more; the card turns Connected when it has.'));
    const save = button(`Save ${name} connection`, { kind: 'primary', 'data-action': 'save' });
    save.addEventListener('click', async () => {
      const body = { exchange: info.id, ...wizard.form.values() };
      let accepted;
      try {
        accepted = await withBusy(save, () => api.post('/connections', body));
      } catch (e) {
        error.textContent = e.field ? `${e.message} (go back to fix ${e.field.replace('_', ' ')})` : e.message;
        error.hidden = false;
        error.focus();
        return;
      }
      wizard.form.clear();
      wizard.form = null;
      dialog.close();
      toast(`${name} saved. Verifying the keys…`, 'ok');
      afterChange();
      connections.pollFast();
      await connections.refresh().catch(() => {});
      connections.focusCard(accepted.connection.id);
    });
    setFooter(button('Back', { onclick: () => stepCredentials() }), h('span', { class: 'spacer' }), save);
  }

  function stepKiteDone(job) {
    const connection = connections.state.connections.find((c) => c.id === job.connection_id);
    show(4, heading('Zerodha is connected'),
      h('div', { class: 'result result-ok', role: 'status' },
        h('p', { text: job.result?.message ?? 'The Kite session works.' })),
      h('dl', { class: 'summary' },
        h('dt', { text: 'Exchange' }), h('dd', { text: 'Zerodha (Kite Connect)' }),
        h('dt', { text: 'API key' }), h('dd', { text: connection?.api_key_hint ?? '—' }),
        h('dt', { text: 'Session' }), h('dd', { text: 'Valid until 06:00 IST; log in to Kite again after that.' })),
      h('h4', { text: 'Permissions' }),
      permissionChips(job.result?.permissions ?? null));
    setFooter(h('span', { class: 'spacer' }), button('Done', {
      kind: 'primary', 'data-action': 'done',
      onclick: async () => {
        dialog.close();
        connections.pollFast();
        await connections.refresh().catch(() => {});
        if (job.connection_id) connections.focusCard(job.connection_id);
      },
    }));
  }

  // ---- Kite's redirect back ----------------------------------------------------------------
  async function completeKiteLogin({ request_token: requestToken, state, status }) {
    wizard.exchange = connections.state.catalog.get('zerodha');
    sessionStorage.removeItem(KITE_PENDING_KEY);
    if (status !== 'success' || !requestToken || !state) {
      stepCredentials({ message: 'The Kite login did not complete. Enter the app\'s key and secret and try again.' });
      return;
    }
    show(3, heading('Checking the Kite session'), h('p', { role: 'status', text: 'Sending Kite\'s answer to Tradeeon…' }));
    setFooter(button('Cancel', { onclick: () => dialog.close() }));
    try {
      const accepted = await withBusy(null, () => api.post('/connections/zerodha/session', { request_token: requestToken, state }));
      stepTest(accepted.job);
    } catch (error) {
      stepCredentials({ message: `${error.message}` });
    }
  }

  if (kiteCallback) completeKiteLogin(kiteCallback);
  else if (wizard.exchange) stepCredentials();
  else stepExchange();
  return dialog;
}
