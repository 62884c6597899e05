// The Connections page: one card per connection, kept live by polling `GET /connections`
// (faster while something is pending). Cards are updated in place, so the keyboard focus on a
// card's buttons survives a refresh.

import * as api from './api.js';
import { $, formatClock, h, replaceChildren, timeElement } from './dom.js';
import { STATUS, exchangeLogo, exchangeName, permissionChips, statusBadge } from './labels.js';

/** Shared page state. `catalog`: exchange id → `GET /exchanges` entry. */
export const state = {
  connections: [],
  catalog: new Map(),
  /** connection id → exchange, for every connection seen this session (the audit log names them). */
  seen: new Map(),
  loaded: false,
};

const FAST_POLL_MS = 2000;
const SLOW_POLL_MS = 10000;

let actions = { test() {}, rotate() {}, revoke() {}, reconnect() {}, history() {} };
let pollTimer = null;
let polling = false;
let fastUntil = 0;
let refreshing = null;
const changeListeners = new Set();

export function setActions(handlers) {
  actions = handlers;
}

/** Called after every successful refresh with `(connections, changes)`. */
export function onRefresh(listener) {
  changeListeners.add(listener);
}

export function byId(id) {
  return state.connections.find((c) => c.id === id);
}

export function byExchange(exchange) {
  return state.connections.find((c) => c.exchange === exchange);
}

export async function loadCatalog() {
  const exchanges = await api.get('/exchanges');
  state.catalog = new Map(exchanges.map((e) => [e.id, e]));
  return exchanges;
}

/** Poll quickly for a while (after a change the user is waiting to see). */
export function pollFast(ms = 60_000) {
  fastUntil = Math.max(fastUntil, Date.now() + ms);
  schedule(0);
}

function schedule(delay) {
  clearTimeout(pollTimer);
  if (!polling) return;
  pollTimer = setTimeout(tick, delay);
}

async function tick() {
  if (!polling || document.hidden) return; // resumed by visibilitychange
  try {
    await refresh();
  } catch {
    /* shown in the live status line; try again */
  }
  if (!polling) return;
  const pending = state.connections.some((c) => c.status === 'pending');
  schedule(pending || Date.now() < fastUntil ? FAST_POLL_MS : SLOW_POLL_MS);
}

let watchingVisibility = false;

export function startPolling() {
  polling = true;
  if (!watchingVisibility) {
    watchingVisibility = true;
    document.addEventListener('visibilitychange', () => {
      if (!document.hidden) schedule(0);
    });
  }
  schedule(0);
}

export function stopPolling() {
  polling = false;
  clearTimeout(pollTimer);
}

/** Fetches the connections and updates the cards. Concurrent calls share one request. */
export function refresh() {
  refreshing ??= (async () => {
    const live = $('#live-status');
    const liveText = $('#live-status-text');
    try {
      const connections = await api.get('/connections');
      const previous = new Map(state.connections.map((c) => [c.id, c]));
      state.connections = connections;
      for (const c of connections) state.seen.set(c.id, c.exchange);
      const changes = connections.filter((c) => previous.has(c.id) && previous.get(c.id).status !== c.status);
      render();
      announce(changes);
      state.loaded = true;
      live.classList.remove('stale');
      liveText.textContent = `Live · updated ${formatClock()}`;
      for (const listener of changeListeners) listener(connections, changes, previous);
      return connections;
    } catch (error) {
      live.classList.add('stale');
      liveText.textContent = `Could not refresh (${error.message}) · retrying`;
      throw error;
    } finally {
      refreshing = null;
    }
  })();
  return refreshing;
}

function announce(changes) {
  if (!changes.length) return;
  const text = changes
    .map((c) => `${exchangeName(c.exchange, state.catalog)} is now ${STATUS[c.status]?.label.toLowerCase() ?? c.status}.`)
    .join(' ');
  $('#status-announcer').textContent = text;
}

function render() {
  const list = $('#connection-list');
  const empty = $('#empty-state');
  empty.hidden = state.connections.length > 0;
  const wanted = new Set(state.connections.map((c) => c.id));
  for (const card of [...list.children]) {
    if (!wanted.has(card.dataset.connectionId)) card.remove();
  }
  state.connections.forEach((connection, index) => {
    let card = list.querySelector(`[data-connection-id="${CSS.escape(connection.id)}"]`);
    if (!card) card = createCard(connection);
    updateCard(card, connection);
    if (list.children[index] !== card) list.insertBefore(card, list.children[index] ?? null);
  });
}

function createCard(connection) {
  const name = exchangeName(connection.exchange, state.catalog);
  const titleId = `card-${connection.id}-title`;
  const button = (text, kind, onclick, label) =>
    h('button', { type: 'button', class: `btn btn-small ${kind}`, 'aria-label': `${label} for ${name}`, onclick }, text);
  const actionsRow = h('div', { class: 'card-actions' });
  if (connection.exchange === 'zerodha') {
    // A Kite session cannot be tested or rotated with static keys: a new login replaces it.
    actionsRow.append(button('Log in to Kite again', 'btn-secondary', () => actions.reconnect(byId(connection.id)), 'Log in to Kite again'));
  } else {
    actionsRow.append(
      button('Test', 'btn-secondary', () => actions.test(byId(connection.id)), 'Test keys'),
      button('Rotate keys', 'btn-secondary', () => actions.rotate(byId(connection.id)), 'Rotate keys'),
    );
  }
  actionsRow.append(button('History', 'btn-secondary', () => actions.history(byId(connection.id)), 'Health history'));
  actionsRow.append(button('Revoke', 'btn-danger-outline', () => actions.revoke(byId(connection.id)), 'Revoke'));

  return h('article', {
    class: 'card', tabindex: '-1', 'aria-labelledby': titleId,
    dataset: { connectionId: connection.id, exchange: connection.exchange },
  },
  h('div', { class: 'card-head' },
    exchangeLogo(connection.exchange),
    h('div', { class: 'card-title' }, h('h3', { id: titleId, text: name }), h('p', { class: 'nickname' })),
    h('span', { class: 'badge-slot' })),
  h('p', { class: 'status-message', hidden: true }),
  h('dl', { class: 'meta' },
    h('div', {}, h('dt', { text: 'Last check' }), h('dd', { class: 'last-check' })),
    h('div', {}, h('dt', { text: 'Latency' }), h('dd', { class: 'latency' })),
    h('div', {}, h('dt', { text: 'API key' }), h('dd', { class: 'key-hint' }))),
  h('div', { class: 'chips-slot' }),
  actionsRow);
}

function updateCard(card, c) {
  card.dataset.status = c.status;
  card.querySelector('.nickname').textContent = c.nickname ?? '';
  card.querySelector('.nickname').hidden = !c.nickname;
  replaceChildren(card.querySelector('.badge-slot'), statusBadge(c.status));
  const message = card.querySelector('.status-message');
  const text = c.status_message || (c.status === 'pending' ? 'Checking the keys with the exchange…' : '');
  message.textContent = text;
  message.hidden = !text;
  replaceChildren(card.querySelector('.last-check'), c.last_checked_at ? timeElement(c.last_checked_at) : 'not yet');
  card.querySelector('.latency').textContent = Number.isFinite(c.last_latency_ms) ? `${c.last_latency_ms} ms` : '—';
  card.querySelector('.key-hint').textContent = c.api_key_hint ?? '—';
  replaceChildren(card.querySelector('.chips-slot'), permissionChips(c.permissions));
}

/** Moves focus to a connection's card (after connecting it). */
export function focusCard(id) {
  const card = $(`#connection-list [data-connection-id="${CSS.escape(id)}"]`);
  if (card) {
    card.focus();
    card.scrollIntoView({ block: 'nearest' });
  }
}
