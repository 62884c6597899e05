// Credential fields for one exchange, as `GET /exchanges` describes them: labels, help text,
// show/hide on secrets, a multi-line field for Coinbase CDP private keys, and errors shown next
// to the field the API names (`error.field`). Values live only in the inputs and are cleared
// after submit.

import { h, uid } from './dom.js';

const SECRET_FIELDS = new Set(['api_secret', 'passphrase']);

function toggleButton(control, label) {
  const button = h('button', {
    type: 'button', class: 'btn btn-secondary btn-small reveal', 'aria-pressed': 'false',
    'aria-controls': control.id, 'aria-label': `Show ${label}`,
  }, 'Show');
  button.addEventListener('click', () => {
    const shown = button.getAttribute('aria-pressed') !== 'true';
    setShown(control, button, label, shown);
  });
  return button;
}

function setShown(control, button, label, shown) {
  button.setAttribute('aria-pressed', String(shown));
  button.setAttribute('aria-label', `${shown ? 'Hide' : 'Show'} ${label}`);
  button.textContent = shown ? 'Hide' : 'Show';
  if (control.tagName === 'TEXTAREA') control.classList.toggle('masked', !shown);
  else control.type = shown ? 'text' : 'password';
}

/**
 * Builds the fields. `exchange` is an entry of `GET /exchanges`. Options: `nickname` (add the
 * optional nickname field), `nicknameValue`.
 * Returns `{element, values(), clear(), validate(), showError(apiError), clearErrors(), focusFirst()}`.
 */
export function credentialForm(exchange, { nickname = false, nicknameValue = '' } = {}) {
  const fields = new Map();
  const formError = h('div', { class: 'form-error', role: 'alert', hidden: true });
  const element = h('div', { class: 'credential-fields', dataset: { exchange: exchange.id } }, formError);

  const specs = exchange.fields.map((f) => ({ ...f }));
  if (nickname) {
    specs.push({ name: 'nickname', label: 'Nickname', required: false, help: 'A name for this connection, e.g. “Main account” (up to 100 characters).' });
  }

  for (const spec of specs) {
    const id = uid(`field-${spec.name}`);
    const helpId = `${id}-help`;
    const errorId = `${id}-error`;
    const secret = SECRET_FIELDS.has(spec.name);
    // Coinbase CDP private keys are multi-line PEM.
    const multiline = exchange.id === 'coinbase' && spec.name === 'api_secret';
    const common = {
      id, name: spec.name, autocomplete: 'off', autocapitalize: 'off', spellcheck: 'false',
      'aria-describedby': spec.help ? helpId : null, required: spec.required ? true : null,
      'aria-required': spec.required ? 'true' : null, dataset: { field: spec.name },
    };
    let control;
    if (multiline) {
      control = h('textarea', { ...common, rows: '6', class: 'masked', placeholder: '-----BEGIN EC PRIVATE KEY-----\n…\n-----END EC PRIVATE KEY-----' });
    } else {
      control = h('input', {
        ...common, type: secret ? 'password' : 'text',
        maxlength: spec.name === 'nickname' ? '100' : '4096',
        value: spec.name === 'nickname' ? nicknameValue : null,
      });
    }
    const error = h('p', { class: 'field-error', id: errorId, hidden: true });
    const label = h('label', { for: id }, spec.label, spec.required ? null : h('span', { class: 'optional', text: ' (optional)' }));
    const row = h('div', { class: 'input-row' }, control, secret ? toggleButton(control, spec.label) : null);
    const field = h('div', { class: 'field', dataset: { field: spec.name } },
      label, row, spec.help ? h('p', { class: 'hint', id: helpId, text: spec.help }) : null, error);
    element.append(field);
    fields.set(spec.name, { spec, control, error, errorId, helpId });
    // An error stays until the field is edited.
    control.addEventListener('input', () => {
      if (error.hidden) return;
      error.hidden = true;
      error.textContent = '';
      control.removeAttribute('aria-invalid');
      if (spec.help) control.setAttribute('aria-describedby', helpId);
      else control.removeAttribute('aria-describedby');
    });
  }

  function setError(name, message) {
    const field = fields.get(name);
    if (!field) return false;
    field.error.textContent = message;
    field.error.hidden = false;
    field.control.setAttribute('aria-invalid', 'true');
    field.control.setAttribute('aria-describedby', [field.spec.help ? field.helpId : null, field.errorId].filter(Boolean).join(' '));
    return true;
  }

  const form = {
    element,
    /** The request body fields (empty optional fields left out). */
    values() {
      const body = {};
      for (const [name, { control }] of fields) {
        const value = control.value;
        if (value.trim() === '' && name !== 'api_key' && name !== 'api_secret') continue;
        body[name] = name === 'nickname' ? value.trim() : value;
      }
      return body;
    },
    /** Wipes every value and hides secrets again. */
    clear() {
      for (const { control } of fields.values()) {
        control.value = '';
      }
      for (const button of element.querySelectorAll('button.reveal')) {
        const control = document.getElementById(button.getAttribute('aria-controls'));
        const name = control?.name;
        if (control) setShown(control, button, fields.get(name)?.spec.label ?? name, false);
      }
    },
    clearErrors() {
      formError.hidden = true;
      formError.textContent = '';
      for (const field of fields.values()) {
        field.error.hidden = true;
        field.error.textContent = '';
        field.control.removeAttribute('aria-invalid');
        if (field.spec.help) field.control.setAttribute('aria-describedby', field.helpId);
        else field.control.removeAttribute('aria-describedby');
      }
    },
    /** Required fields filled? Marks the empty ones and focuses the first. */
    validate() {
      form.clearErrors();
      let first = null;
      for (const [name, { spec, control }] of fields) {
        if (spec.required && control.value.trim() === '') {
          setError(name, `${spec.label} is required.`);
          first ??= control;
        }
      }
      first?.focus();
      return first === null;
    },
    /** Shows an API error next to its field (or above the fields). Focuses it. */
    showError(error) {
      if (error.field && setError(error.field, error.message)) {
        fields.get(error.field).control.focus();
        return;
      }
      formError.textContent = error.message;
      formError.hidden = false;
      formError.setAttribute('tabindex', '-1');
      formError.focus();
    },
    focusFirst() {
      fields.values().next().value?.control.focus();
    },
    has(name) {
      return fields.has(name);
    },
  };
  return form;
}
