// A connection's health history (`GET /connections/{id}/history`): a chart of the recent checks —
// a band coloured by status and a line of latencies, drawn here as SVG — and the same checks as a
// table, which is what screen readers and "Load older checks" use.

import * as api from './api.js';
import * as connections from './connections.js';
import { button, openDialog } from './dialog.js';
import { formatDateTime, h, replaceChildren } from './dom.js';
import { CODES, STATUS, exchangeName, statusBadge } from './labels.js';

const PAGE_SIZE = 200;
const SVG = 'http://www.w3.org/2000/svg';
const WIDTH = 640;
const BAND = 14;
const PLOT_TOP = BAND + 12;
const HEIGHT = 150;

function svg(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === 'text') el.textContent = value;
    else el.setAttribute(name, String(value));
  }
  el.append(...children);
  return el;
}

/**
 * The chart of `checks` (newest first, as the API answers): time runs left to right, each check
 * colours the band from its time to the next check's, and the line joins the latencies.
 */
export function chart(checks) {
  const points = checks
    .map((c) => ({ ...c, t: new Date(c.checked_at).getTime() }))
    .filter((c) => Number.isFinite(c.t))
    .reverse();
  const first = points[0].t;
  const last = points[points.length - 1].t;
  const span = Math.max(last - first, 1);
  const x = (t) => (points.length === 1 ? WIDTH : ((t - first) / span) * WIDTH);
  const latencies = points.map((p) => p.latency_ms).filter(Number.isFinite);
  const top = Math.max(...latencies, 1);
  const y = (ms) => HEIGHT - 4 - (ms / top) * (HEIGHT - PLOT_TOP - 8);

  const band = points.map((p, i) => {
    const from = points.length === 1 ? 0 : x(p.t);
    const to = i + 1 < points.length ? x(points[i + 1].t) : WIDTH;
    return svg('rect', { class: `band band-${p.status}`, x: from, y: 0, width: Math.max(to - from, 1), height: BAND },
      svg('title', { text: `${formatDateTime(p.checked_at)}: ${STATUS[p.status]?.label ?? p.status}` }));
  });
  const measured = points.filter((p) => Number.isFinite(p.latency_ms));
  const line = measured.length > 1
    ? svg('polyline', { class: 'latency-line', points: measured.map((p) => `${x(p.t)},${y(p.latency_ms)}`).join(' ') })
    : null;
  const dots = measured.map((p) => svg('circle', { class: `latency-dot dot-${p.status}`, cx: x(p.t), cy: y(p.latency_ms), r: 2.5 },
    svg('title', { text: `${formatDateTime(p.checked_at)}: ${p.latency_ms} ms` })));

  const connected = points.filter((p) => p.status === 'connected').length;
  const summary = `${points.length} check${points.length === 1 ? '' : 's'} from ${formatDateTime(points[0].checked_at)} `
    + `to ${formatDateTime(points[points.length - 1].checked_at)}; connected in ${connected}`
    + (latencies.length ? `; slowest answer ${top} ms.` : '.');
  const figure = svg('svg', {
    class: 'history-chart', viewBox: `0 0 ${WIDTH} ${HEIGHT}`, preserveAspectRatio: 'none', role: 'img',
    'aria-label': summary,
  },
  svg('line', { class: 'axis', x1: 0, x2: WIDTH, y1: HEIGHT - 4, y2: HEIGHT - 4 }),
  ...band, ...(line ? [line] : []), ...dots);
  return h('figure', { class: 'history-figure' }, figure,
    h('figcaption', { class: 'history-scale' },
      h('span', { text: formatDateTime(points[0].checked_at) }),
      h('span', { text: latencies.length ? `latency, up to ${top} ms` : 'no latency measured' }),
      h('span', { text: formatDateTime(points[points.length - 1].checked_at) })));
}

function row(check) {
  const code = check.code ? (CODES[check.code] ?? check.code) : '—';
  return h('tr', {},
    h('td', { 'data-label': 'Checked' }, h('time', { datetime: check.checked_at, text: formatDateTime(check.checked_at) })),
    h('td', { 'data-label': 'Status' }, statusBadge(check.status)),
    h('td', { 'data-label': 'Outcome', text: check.message ? `${code}: ${check.message}` : code }),
    h('td', { 'data-label': 'Latency', text: Number.isFinite(check.latency_ms) ? `${check.latency_ms} ms` : '—' }));
}

/** Opens the history of `connection` in a dialog. */
export function openHistory(connection) {
  const name = exchangeName(connection.exchange, connections.state.catalog);
  const card = document.querySelector(`[data-connection-id="${CSS.escape(connection.id)}"]`);
  const dialog = openDialog({ title: `Health history · ${connection.nickname || name}`, returnFocus: card });
  const chartSlot = h('div', { class: 'history-chart-slot', 'aria-live': 'polite', text: 'Loading the checks…' });
  const rows = h('tbody', {});
  const table = h('table', { class: 'audit-table history-table', hidden: true },
    h('caption', { class: 'visually-hidden', text: `Health checks of ${name}, newest first` }),
    h('thead', {}, h('tr', {}, ...['Checked', 'Status', 'Outcome', 'Latency'].map((t) => h('th', { scope: 'col', text: t })))),
    rows);
  const more = button('Load older checks', { 'data-action': 'more', hidden: true });
  dialog.body.append(chartSlot, h('div', { class: 'table-wrap' }, table), more);
  replaceChildren(dialog.footer, button('Close', { kind: 'primary', onclick: () => dialog.close() }));
  dialog.focusFirst();

  let next = null;
  const checks = [];
  async function load(path) {
    dialog.setBusy(true);
    try {
      const { data, headers } = await api.request('GET', path);
      checks.push(...data);
      rows.append(...data.map(row));
      next = api.nextLink(headers);
      if (checks.length) replaceChildren(chartSlot, chart(checks));
      else chartSlot.textContent = 'No checks yet: the first one runs shortly after the keys are saved.';
      table.hidden = checks.length === 0;
      more.hidden = !next;
    } catch (error) {
      chartSlot.textContent = `Could not load the history: ${error.message}`;
    } finally {
      dialog.setBusy(false);
    }
  }
  more.addEventListener('click', async () => {
    if (!next) return;
    const firstNew = rows.children.length;
    more.disabled = true;
    await load(next);
    more.disabled = false;
    const added = rows.children[firstNew];
    if (added) {
      added.setAttribute('tabindex', '-1');
      added.focus();
    }
  });
  load(`/connections/${encodeURIComponent(connection.id)}/history?limit=${PAGE_SIZE}`);
}
