// The security panel: the egress IPs to whitelist (`GET /egress`, with copy buttons) and the
// audit log (`GET /connections/audit`, newest first, older pages through the `Link` header).

import * as api from './api.js';
import * as connections from './connections.js';
import { $, formatDateTime, h, relativeTime, replaceChildren } from './dom.js';
import { AUDIT_ACTIONS, auditDetails, exchangeName } from './labels.js';

const PAGE_SIZE = 20;
let nextPage = null;
let loading = null;

async function copy(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    // Older browsers or no clipboard permission: select-and-copy through a scratch field.
    const scratch = h('textarea', { class: 'visually-hidden', 'aria-hidden': 'true' });
    scratch.value = text;
    document.body.append(scratch);
    scratch.select();
    const ok = document.execCommand('copy');
    scratch.remove();
    return ok;
  }
}

export async function loadEgress() {
  const { ips } = await api.get('/egress');
  const list = $('#egress-list');
  const status = $('#copy-status');
  $('#egress-empty').hidden = ips.length > 0;
  replaceChildren(list, ips.map((ip) => {
    const copyButton = h('button', { type: 'button', class: 'btn btn-secondary btn-small', 'aria-label': `Copy ${ip}` }, 'Copy');
    copyButton.addEventListener('click', async () => {
      const ok = await copy(ip);
      copyButton.textContent = ok ? 'Copied' : 'Copy failed';
      status.textContent = ok ? `${ip} copied to the clipboard.` : `Could not copy ${ip}; select it and copy it by hand.`;
      setTimeout(() => { copyButton.textContent = 'Copy'; }, 2500);
    });
    return h('li', {}, h('code', { text: ip }), copyButton);
  }));
  if (ips.length > 1) {
    const all = h('button', { type: 'button', class: 'btn btn-ghost btn-small', 'aria-label': 'Copy all addresses' }, 'Copy all');
    all.addEventListener('click', async () => {
      const ok = await copy(ips.join(', '));
      status.textContent = ok ? 'All addresses copied to the clipboard.' : 'Could not copy the addresses.';
    });
    list.append(h('li', { class: 'copy-all' }, h('span', { class: 'hint', text: `${ips.length} addresses` }), all));
  }
}

function auditRow(entry) {
  const exchange = connections.state.seen.get(entry.connection_id) ?? entry.details?.exchange ?? null;
  return h('tr', { dataset: { action: entry.action, id: entry.id } },
    h('td', { 'data-label': 'When' }, h('time', { datetime: entry.created_at, title: formatDateTime(entry.created_at), text: relativeTime(entry.created_at) })),
    h('td', { 'data-label': 'Event' }, h('span', { class: `action action-${entry.action}`, text: AUDIT_ACTIONS[entry.action] ?? entry.action })),
    h('td', { 'data-label': 'Exchange', text: exchange ? exchangeName(exchange, connections.state.catalog) : '—' }),
    h('td', { 'data-label': 'Details', class: 'details', text: auditDetails(entry) }),
    h('td', { 'data-label': 'From', text: entry.ip_address ?? '—', title: entry.user_agent ?? '' }));
}

async function loadPage(path, replace) {
  const { data, headers } = await api.request('GET', path);
  const rows = $('#audit-rows');
  if (replace) replaceChildren(rows);
  rows.append(...data.map(auditRow));
  nextPage = api.nextLink(headers);
  const empty = $('#audit-empty');
  empty.dataset.text ??= empty.textContent;
  empty.textContent = empty.dataset.text;
  empty.hidden = rows.children.length > 0;
  $('#audit-table-wrap').hidden = rows.children.length === 0;
  $('#audit-more').hidden = !nextPage;
  $('#audit-end').hidden = Boolean(nextPage) || rows.children.length === 0;
}

/** Reloads the newest page (after an action, or on Refresh). */
export function refreshAudit() {
  loading = (loading ?? Promise.resolve())
    .catch(() => {})
    .then(() => loadPage(`/connections/audit?limit=${PAGE_SIZE}`, true));
  return loading;
}

export function initAudit() {
  $('#audit-refresh').addEventListener('click', () => refreshAudit().catch(showError));
  $('#audit-more').addEventListener('click', async () => {
    if (!nextPage) return;
    const button = $('#audit-more');
    button.disabled = true;
    const firstNew = $('#audit-rows').children.length;
    try {
      await loadPage(nextPage, false);
      // Keyboard users continue from the first row that was added.
      const row = $('#audit-rows').children[firstNew];
      if (row) {
        row.setAttribute('tabindex', '-1');
        row.focus();
      }
    } catch (error) {
      showError(error);
    } finally {
      button.disabled = false;
    }
  });
}

function showError(error) {
  const empty = $('#audit-empty');
  empty.dataset.text ??= empty.textContent;
  empty.hidden = false;
  empty.textContent = `Could not load the audit log: ${error.message}`;
}
