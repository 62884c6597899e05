// The card actions' dialogs: test keys, rotate keys, revoke.

import * as api from './api.js';
import * as connections from './connections.js';
import { credentialForm } from './credentials.js';
import { button, openDialog } from './dialog.js';
import { h, replaceChildren, toast } from './dom.js';
import { followJob, waitForJob } from './jobs.js';
import { exchangeName } from './labels.js';

let afterChange = () => {};

/** `fn()` runs after something changed a connection (the page refreshes the audit log). */
export function onConnectionChange(fn) {
  afterChange = fn;
}

function credentialFields(connection) {
  const info = connections.state.catalog.get(connection.exchange);
  return credentialForm(info);
}

/**
 * A dialog with credential fields whose submit starts a job and follows it. `submit(values)`
 * returns the accepted job; `done(job)` runs when it finished.
 */
function credentialJobDialog({ connection, title, intro, submitLabel, what, okTitle, failTitle, submit, done, footnote }) {
  const name = exchangeName(connection.exchange, connections.state.catalog);
  const fallback = document.querySelector(`[data-connection-id="${CSS.escape(connection.id)}"]`)
    ?? document.getElementById('connect-button');
  let abort = null;
  const form = credentialFields(connection);
  const dialog = openDialog({
    title,
    returnFocus: fallback,
    onClose() {
      abort?.abort();
      form.clear();
    },
  });
  const jobArea = h('div', { class: 'job-area', 'aria-live': 'polite' });
  const formEl = h('form', { novalidate: true, onsubmit: (e) => { e.preventDefault(); run(); } },
    form.element, h('button', { type: 'submit', hidden: true, tabindex: '-1' }));
  dialog.body.append(intro, formEl, jobArea);
  if (footnote) dialog.body.append(footnote);
  const submitButton = button(submitLabel, { kind: 'primary', 'data-action': 'submit', onclick: () => run() });
  const cancelButton = button('Cancel', { onclick: () => dialog.close(), 'data-action': 'cancel' });
  replaceChildren(dialog.footer, cancelButton, submitButton);
  form.focusFirst();

  async function run() {
    if (!form.validate()) return;
    const values = form.values();
    dialog.setBusy(true);
    submitButton.disabled = true;
    let job;
    try {
      job = await submit(values);
    } catch (error) {
      dialog.setBusy(false);
      submitButton.disabled = false;
      if (error.code === 'job_in_progress' && error.jobId) {
        await waitForOther(error.jobId);
        return;
      }
      form.showError(error);
      return;
    }
    dialog.setBusy(false);
    // The secrets have been sent: they leave the page now.
    form.clear();
    formEl.hidden = true;
    submitButton.hidden = true;
    cancelButton.textContent = 'Close';
    abort = new AbortController();
    try {
      const finished = await followJob(jobArea, job, { what, signal: abort.signal, okTitle, failTitle, exchange: name });
      done?.(finished, { jobArea });
      const ok = finished.status === 'done' && finished.result?.ok;
      const again = button(ok ? 'Done' : 'Try other keys', {
        kind: ok ? 'primary' : 'secondary',
        'data-action': ok ? 'done' : 'retry',
        onclick: () => {
          if (ok) {
            dialog.close();
            return;
          }
          replaceChildren(jobArea);
          formEl.hidden = false;
          submitButton.hidden = false;
          submitButton.disabled = false;
          again.remove();
          cancelButton.textContent = 'Cancel';
          form.focusFirst();
        },
      });
      dialog.footer.append(again);
      again.focus();
    } catch (error) {
      if (error.name !== 'AbortError') {
        jobArea.append(h('div', { class: 'result result-fail', role: 'alert' }, h('p', { text: error.message })));
      }
    }
  }

  /** A rotation or verification is already running: show it, then let the user retry. */
  async function waitForOther(jobId) {
    replaceChildren(jobArea, h('p', { class: 'callout callout-warn', role: 'status',
      text: 'A verification or rotation of this connection is already running. Waiting for it to finish…' }));
    submitButton.disabled = true;
    abort = new AbortController();
    try {
      await waitForJob(jobId, { signal: abort.signal });
      replaceChildren(jobArea, h('p', { class: 'callout', role: 'status', text: 'It has finished. You can submit your keys now.' }));
    } catch (error) {
      if (error.name === 'AbortError') return;
    }
    submitButton.disabled = false;
    connections.pollFast();
  }
  return dialog;
}

/** Test keys for a connection's exchange without saving them. */
export function openTest(connection) {
  const name = exchangeName(connection.exchange, connections.state.catalog);
  return credentialJobDialog({
    connection,
    title: `Test keys for ${name}`,
    intro: h('p', { class: 'callout' }, `Check a ${name} key — for example one you are about to rotate to — without saving it. `,
      'The saved connection is not changed; it is re-checked automatically every few minutes.'),
    submitLabel: 'Run test',
    what: `Checking with ${name}`,
    okTitle: 'The key works',
    failTitle: 'The key did not work',
    submit: async (values) => (await api.post('/connections/test', { exchange: connection.exchange, ...values })).job,
    done: () => afterChange(),
  });
}

/** Rotate keys: the new key is tested by the worker first and swapped in only if it passes. */
export function openRotate(connection) {
  const name = exchangeName(connection.exchange, connections.state.catalog);
  return credentialJobDialog({
    connection,
    title: `Rotate keys for ${name}`,
    intro: h('p', { class: 'callout' },
      `Enter the new ${name} key. It is tested first: only if it works does it replace the current key (${connection.api_key_hint ?? 'saved'}). `,
      'If it fails, the current key stays in use.'),
    submitLabel: 'Test and rotate',
    what: `Testing the new key with ${name}`,
    okTitle: 'Keys rotated',
    failTitle: 'The new keys were refused — your previous keys are still in use',
    submit: async (values) => (await api.post(`/connections/${encodeURIComponent(connection.id)}/rotate`, values)).job,
    done: (job, { jobArea }) => {
      const ok = job.status === 'done' && job.result?.ok;
      jobArea.append(h('p', { class: 'hint', dataset: { outcome: ok ? 'rotated' : 'kept' } }, ok
        ? `${name} now uses the new key. Delete the old key on ${name}.`
        : `Nothing was changed: ${name} keeps using the key ${connection.api_key_hint ?? 'saved before'}.`));
      afterChange();
      connections.pollFast();
      connections.refresh().catch(() => {});
      toast(ok ? `${name}: keys rotated.` : `${name}: rotation refused; previous keys kept.`, ok ? 'ok' : 'error');
    },
  });
}

/** Revoke: soft delete; the stored secrets are destroyed. */
export function openRevoke(connection) {
  const name = exchangeName(connection.exchange, connections.state.catalog);
  const label = connection.nickname ? `${name} (${connection.nickname})` : name;
  const dialog = openDialog({
    title: `Revoke ${name}?`,
    returnFocus: document.getElementById('connect-button'),
  });
  dialog.dialog.dataset.testid = 'revoke';
  const error = h('div', { class: 'form-error', role: 'alert', hidden: true, tabindex: '-1' });
  dialog.body.append(
    error,
    h('p', {}, 'Tradeeon will stop using your ', h('strong', { text: label }), ' connection (key ',
      h('span', { class: 'nowrap', text: connection.api_key_hint ?? '' }),
      `) and destroy the stored keys. This cannot be undone; to use ${name} again you connect it anew.`),
    h('p', { class: 'callout callout-warn', text: `Also delete the key on ${name} itself if you no longer need it.` }),
  );
  const cancel = button('Cancel', { 'data-action': 'cancel', onclick: () => dialog.close() });
  const confirm = button(`Revoke ${name}`, { kind: 'danger', 'data-action': 'confirm' });
  confirm.addEventListener('click', async () => {
    dialog.setBusy(true);
    confirm.disabled = true;
    cancel.disabled = true;
    try {
      await api.del(`/connections/${encodeURIComponent(connection.id)}`);
    } catch (e) {
      dialog.setBusy(false);
      confirm.disabled = false;
      cancel.disabled = false;
      error.textContent = e.status === 404 ? `This ${name} connection no longer exists.` : e.message;
      error.hidden = false;
      error.focus();
      if (e.status === 404) connections.refresh().catch(() => {});
      return;
    }
    dialog.setBusy(false);
    dialog.close();
    toast(`${name} connection revoked; its stored keys were destroyed.`, 'ok');
    afterChange();
    await connections.refresh().catch(() => {});
    document.getElementById(connections.state.connections.length ? 'connect-button' : 'empty-connect-button')?.focus();
  });
  replaceChildren(dialog.footer, cancel, confirm);
  // The safe choice has the focus.
  cancel.focus();
  return dialog;
}
