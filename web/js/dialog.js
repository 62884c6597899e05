// Modal dialogs on the native <dialog> (showModal makes the rest of the page inert), plus what
// it does not do by itself: Tab and Shift+Tab wrap inside the dialog (focus trap), Escape closes
// it unless it is busy, and focus returns to what opened it.

import { h, uid } from './dom.js';

const FOCUSABLE = [
  'a[href]', 'button:not([disabled])', 'input:not([disabled]):not([type="hidden"])', 'select:not([disabled])',
  'textarea:not([disabled])', '[tabindex]:not([tabindex="-1"])',
].join(',');

function focusables(root) {
  return [...root.querySelectorAll(FOCUSABLE)].filter((el) => el.getClientRects().length > 0 && !el.closest('[hidden]'));
}

/**
 * Opens a modal. Returns a handle: `{dialog, body, footer, titleEl, close(), setBusy(bool), setTitle(text)}`.
 * `returnFocus`: element to focus after closing when the opener no longer exists.
 */
export function openDialog({ title, className = '', onClose = () => {}, returnFocus = null, label = null }) {
  const opener = document.activeElement;
  const titleId = uid('dialog-title');
  const titleEl = h('h2', { id: titleId, text: title });
  const closeButton = h('button', { type: 'button', class: 'btn btn-ghost btn-icon', 'aria-label': 'Close' },
    h('span', { 'aria-hidden': 'true', text: '✕' }));
  const body = h('div', { class: 'modal-body' });
  const footer = h('div', { class: 'modal-foot' });
  const dialog = h('dialog', { class: `modal ${className}`, 'aria-labelledby': label ? null : titleId, 'aria-label': label },
    h('div', { class: 'modal-head' }, titleEl, closeButton), body, footer);

  let busy = false;
  let closed = false;
  const handle = {
    dialog, body, footer, titleEl,
    setBusy(value) {
      busy = value;
      dialog.setAttribute('aria-busy', value ? 'true' : 'false');
    },
    setTitle(text) { titleEl.textContent = text; },
    close() {
      if (closed) return;
      closed = true;
      dialog.close();
      dialog.remove();
      onClose();
      const target = opener && opener.isConnected && opener !== document.body ? opener : returnFocus;
      if (target && target.isConnected) target.focus();
    },
    focusFirst() {
      const first = body.querySelector('[autofocus]') ?? focusables(body)[0] ?? closeButton;
      first.focus();
    },
  };

  closeButton.addEventListener('click', () => { if (!busy) handle.close(); });
  // Escape fires `cancel`; a busy dialog (a request in flight) stays open.
  dialog.addEventListener('cancel', (event) => {
    event.preventDefault();
    if (!busy) handle.close();
  });
  dialog.addEventListener('keydown', (event) => {
    if (event.key !== 'Tab') return;
    const items = focusables(dialog);
    if (items.length === 0) return;
    const first = items[0];
    const last = items[items.length - 1];
    const inside = dialog.contains(document.activeElement);
    if (event.shiftKey && (document.activeElement === first || !inside)) {
      event.preventDefault();
      last.focus();
    } else if (!event.shiftKey && (document.activeElement === last || !inside)) {
      event.preventDefault();
      first.focus();
    }
  });
  // A click on the backdrop (outside the dialog box) closes it, like Escape.
  dialog.addEventListener('mousedown', (event) => {
    if (event.target === dialog && !busy) {
      const r = dialog.getBoundingClientRect();
      const outside = event.clientX < r.left || event.clientX > r.right || event.clientY < r.top || event.clientY > r.bottom;
      if (outside) handle.close();
    }
  });

  document.body.append(dialog);
  dialog.showModal();
  return handle;
}

/** A footer button. */
export function button(text, { kind = 'secondary', onclick, type = 'button', ...attrs } = {}) {
  return h('button', { type, class: `btn btn-${kind}`, onclick, ...attrs }, text);
}
