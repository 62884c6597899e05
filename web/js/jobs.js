// Jobs: every check runs on a worker; the page polls `GET /jobs/{id}` until the job is `done`
// (the verdict is in `result`, which may be a failed check) or `failed` (`error` says why).

import * as api from './api.js';
import { h, replaceChildren, sleep } from './dom.js';
import { CODES, permissionChips, warningText } from './labels.js';

/** Polls until the job settles; `onUpdate(job)` sees every state. Abort with `signal`. */
export async function waitForJob(jobId, { onUpdate = () => {}, signal } = {}) {
  const started = Date.now();
  let networkFailures = 0;
  for (;;) {
    let job;
    try {
      job = await api.get(`/jobs/${encodeURIComponent(jobId)}`);
      networkFailures = 0;
    } catch (error) {
      // A dropped request is not a verdict: keep polling for a while.
      if (error.status === 0 && networkFailures < 10) {
        networkFailures += 1;
        await sleep(1000, signal);
        continue;
      }
      throw error;
    }
    onUpdate(job);
    if (job.status === 'done' || job.status === 'failed') return job;
    const elapsed = Date.now() - started;
    await sleep(elapsed < 10_000 ? 500 : elapsed < 60_000 ? 1000 : 2500, signal);
  }
}

/**
 * A progress panel for one job: an indeterminate bar while it is queued or running, then full.
 * Returns `{element, update(job)}`.
 */
export function jobProgress(what) {
  const bar = h('progress', { max: '1', 'aria-label': `${what} progress` });
  const text = h('p', { class: 'progress-text', text: 'Sending…' });
  const meta = h('p', { class: 'progress-meta' });
  const element = h('div', { class: 'progress-box', role: 'status', 'aria-live': 'polite', dataset: { state: 'sending' } },
    bar, text, meta);
  const started = Date.now();
  function update(job) {
    element.dataset.state = job.status;
    element.dataset.jobId = job.id;
    const seconds = Math.round((Date.now() - started) / 1000);
    if (job.status === 'queued') {
      bar.removeAttribute('value');
      text.textContent = job.attempts > 0 ? `Waiting to retry (attempt ${job.attempts + 1})…` : 'Queued — waiting for a worker…';
    } else if (job.status === 'running') {
      bar.removeAttribute('value');
      text.textContent = `${what}… ${job.attempts > 1 ? `(attempt ${job.attempts})` : ''}`.trim();
    } else {
      bar.value = 1;
      text.textContent = job.status === 'done' ? 'Finished.' : 'Could not be carried out.';
    }
    meta.textContent = `Job ${job.id} · ${job.status} · ${seconds} s`;
  }
  return { element, update };
}

/** The verdict of a finished job, as a result box (or the reason a job failed). */
export function jobResult(job, { okTitle, failTitle, exchange, extra = null }) {
  if (job.status === 'failed') {
    return h('div', { class: 'result result-fail', role: 'alert', dataset: { ok: 'false', code: 'job_failed' } },
      h('h3', { text: failTitle }),
      h('p', { text: job.error || 'The job could not be carried out.' }));
  }
  const result = job.result ?? { ok: false, code: 'bad_response', message: 'No result.', warnings: [] };
  const box = h('div', {
    class: `result ${result.ok ? 'result-ok' : 'result-fail'}`,
    role: result.ok ? 'status' : 'alert',
    dataset: { ok: String(result.ok), code: result.code },
  },
  h('h3', { text: result.ok ? okTitle : failTitle }),
  h('p', { class: 'result-message', text: result.message }),
  h('p', { class: 'hint' },
    result.ok
      ? `${exchange} answered in ${result.latency_ms} ms.`
      : `${CODES[result.code] ?? result.code} (${result.code}).`),
  result.permissions ? permissionChips(result.permissions) : null,
  result.warnings?.length
    ? h('ul', { class: 'warnings', 'aria-label': 'Warnings' },
      result.warnings.map((w) => h('li', { dataset: { warning: w } }, h('span', { 'aria-hidden': 'true', text: '⚠ ' }), warningText(w))))
    : null,
  extra);
  return box;
}

/** Runs a job to completion inside `container`, showing progress then the result. */
export async function followJob(container, job, { what, signal, ...resultOptions }) {
  const progress = jobProgress(what);
  replaceChildren(container, progress.element);
  progress.update(job);
  const finished = await waitForJob(job.id, { onUpdate: progress.update, signal });
  container.append(jobResult(finished, resultOptions));
  return finished;
}
