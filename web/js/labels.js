// Words for the API's codes. Anything unknown is shown as the code itself, so a newer server
// never breaks the page.

import { h } from './dom.js';

export const STATUS = {
  connected: { label: 'Connected', icon: '●', text: 'Working: authenticated, permissions as expected.' },
  degraded: { label: 'Degraded', icon: '▲', text: 'Works, but slow, rate-limited, failing now and then, or its permissions changed.' },
  error: { label: 'Error', icon: '✕', text: 'The exchange refused the key.' },
  expired: { label: 'Expired', icon: '◷', text: 'The Zerodha session ended; log in to Kite again.' },
  pending: { label: 'Pending', icon: '◌', text: 'Saved; being checked.' },
};

export function statusBadge(status) {
  const known = STATUS[status] ?? { label: status, icon: '?' };
  return h('span', { class: `badge badge-${status}`, dataset: { status }, title: known.text ?? '' },
    h('span', { 'aria-hidden': 'true', text: known.icon }),
    h('span', { class: 'visually-hidden', text: 'Status: ' }),
    known.label);
}

const EXCHANGE_NAMES = { binance: 'Binance', coinbase: 'Coinbase', kraken: 'Kraken', zerodha: 'Zerodha' };

export function exchangeName(id, catalog) {
  const info = catalog?.get?.(id);
  if (id === 'zerodha') return 'Zerodha';
  return info?.name ?? EXCHANGE_NAMES[id] ?? id ?? 'Unknown exchange';
}

export function exchangeLogo(id) {
  return h('span', { class: `logo logo-${id}`, 'aria-hidden': 'true', text: (EXCHANGE_NAMES[id] ?? id ?? '?')[0] });
}

export const CODES = {
  ok: 'Authenticated',
  invalid_credentials: 'The exchange does not know this API key',
  invalid_signature: 'The secret does not match the key',
  ip_not_allowed: 'The key does not allow our IP address',
  permission_denied: 'The key lacks a permission we need',
  clock_skew: 'Clocks disagree',
  invalid_nonce: 'Nonce rejected',
  rate_limited: 'The exchange is rate-limiting us',
  exchange_unavailable: 'The exchange is unavailable',
  timeout: 'The exchange did not answer in time',
  session_expired: 'The session has expired',
  bad_response: 'The exchange answered something unexpected',
};

export const WARNINGS = {
  withdrawals_enabled: 'This key can withdraw funds. Create a key without the withdrawal permission: Tradeeon never needs it.',
  no_ip_restriction: 'This key is not restricted to our IP addresses. Add them (see Security) so a leaked key is useless elsewhere.',
};

export function warningText(code) {
  return WARNINGS[code] ?? code.replace(/_/g, ' ');
}

/** Chips for a permissions object (`null`: not checked yet). */
export function permissionChips(permissions) {
  const list = h('ul', { class: 'chips', 'aria-label': 'Permissions' });
  if (!permissions) {
    list.append(h('li', { class: 'chip', text: 'Permissions not checked yet' }));
    return list;
  }
  const chip = (kind, icon, text, title) =>
    h('li', { class: `chip chip-${kind}`, title }, h('span', { 'aria-hidden': 'true', text: icon }), text);
  list.append(
    permissions.read
      ? chip('ok', '✓', 'Read', 'The key can read balances and orders.')
      : chip('danger', '✕', 'No read access', 'The key cannot read balances: checks and trading will fail.'),
    permissions.trade
      ? chip('ok', '✓', 'Trade', 'The key can place orders.')
      : chip('off', '–', 'No trading', 'The key cannot place orders.'),
    permissions.withdraw
      ? chip('warn', '⚠', 'Withdrawals enabled', WARNINGS.withdrawals_enabled)
      : chip('ok', '✓', 'No withdrawals', 'The key cannot move funds out.'),
    permissions.ip_restricted
      ? chip('ok', '✓', 'IP-restricted', 'The key only works from whitelisted addresses.')
      : chip('warn', '⚠', 'Not IP-restricted', WARNINGS.no_ip_restriction),
  );
  return list;
}

export const AUDIT_ACTIONS = {
  connected: 'Connected',
  tested: 'Keys tested',
  rotated: 'Keys rotated',
  rotate_failed: 'Rotation refused',
  revoked: 'Revoked',
  status_changed: 'Status changed',
  session_created: 'Kite session created',
};

/** One line describing an audit row's details. */
export function auditDetails(entry) {
  const d = entry.details ?? {};
  const parts = [];
  if (d.stage === 'submitted' && entry.action === 'connected') parts.push('Keys saved; verification queued');
  if (d.stage === 'submitted' && entry.action === 'tested') parts.push('Keys submitted for a test (not saved)');
  // Written when the test settles: `ok` is the verdict; `failed` means it could not be run.
  if (d.stage === 'finished' && entry.action === 'tested') {
    if (d.outcome === 'failed') parts.push('The test could not be carried out');
    else parts.push(d.ok ? 'The keys work (not saved)' : 'The keys failed the test (not saved)');
  }
  if (d.stage === 'login_started') parts.push('Kite login started');
  if (entry.action === 'status_changed' && d.from && d.to) parts.push(`${STATUS[d.from]?.label ?? d.from} → ${STATUS[d.to]?.label ?? d.to}`);
  if (entry.action !== 'status_changed' && d.status) parts.push(`status ${STATUS[d.status]?.label ?? d.status}`);
  if (d.api_key_hint) parts.push(`key ${d.api_key_hint}`);
  if (d.code && d.code !== 'ok') parts.push(CODES[d.code] ?? d.code);
  if (d.message && entry.action !== 'connected') parts.push(d.message);
  if (Number.isFinite(d.latency_ms)) parts.push(`${d.latency_ms} ms`);
  if (Array.isArray(d.warnings) && d.warnings.length) parts.push(`warnings: ${d.warnings.map((w) => w.replace(/_/g, ' ')).join(', ')}`);
  if (d.expires_at) parts.push(`session expires ${new Date(d.expires_at).toLocaleString()}`);
  if (entry.action === 'revoked') parts.push('Stored keys destroyed');
  return parts.join(' · ') || '—';
}
