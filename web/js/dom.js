// Small DOM helpers. User data only ever reaches the page as text nodes (textContent or
// createTextNode): nothing here parses HTML.

export const $ = (id) => document.getElementById(id);

/**
 * Creates an element. `attrs` are set as attributes (`class`, `data-*`, `aria-*` ...) or, for
 * `on*` keys, as listeners; children are nodes or strings (added as text).
 */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    node.append(typeof c === 'string' || typeof c === 'number' ? document.createTextNode(String(c)) : c);
  }
  return node;
}

/** Replaces all children of `node`. */
export function fill(node, ...children) {
  node.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined));
}

/** Shows `message` in an error paragraph, or hides it when empty. */
export function showError(node, message) {
  node.textContent = message || '';
  node.hidden = !message;
}

/** An RFC 3339 time as local time, the exact value in the tooltip. */
export function time(iso) {
  if (!iso) return el('span', { class: 'muted' }, '—');
  const d = new Date(iso);
  return el('time', { datetime: iso, title: iso }, Number.isNaN(d.getTime()) ? iso : d.toLocaleString());
}

/** Milliseconds with a sensible precision. */
export function ms(v) {
  if (v === null || v === undefined) return '—';
  return `${v < 10 ? v.toFixed(1) : Math.round(v)} ms`;
}

/** A byte count in binary units. */
export function bytes(n) {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = n;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i += 1;
  }
  return i === 0 ? `${n} B` : `${v.toFixed(1)} ${units[i]}`;
}

/** A coloured status label. */
export function badge(text, kind) {
  return el('span', { class: `badge ${kind}` }, text);
}

/** A `<dl>` body from [term, value] pairs (value: string or node). */
export function fields(dl, pairs) {
  fill(dl, pairs.flatMap(([term, value, attrs = {}]) => [
    el('dt', {}, term),
    el('dd', attrs, value === undefined || value === null || value === '' ? el('span', { class: 'muted' }, '—') : value),
  ]));
}

/** Copies text to the clipboard; falls back to a selection copy where the API is missing. */
export async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    await navigator.clipboard.writeText(text);
    return;
  }
  const area = el('textarea', { class: 'visually-hidden', readonly: true });
  area.value = text;
  document.body.append(area);
  area.select();
  const ok = document.execCommand('copy');
  area.remove();
  if (!ok) throw new Error('the browser refused to copy; select the text and copy it by hand');
}

/** Wires every `[data-close]` button of each dialog to close it. */
export function wireDialogs() {
  for (const dlg of document.querySelectorAll('dialog')) {
    for (const b of dlg.querySelectorAll('[data-close]')) b.addEventListener('click', () => dlg.close());
  }
}

/** Whether any dialog is open (live refresh pauses meanwhile). */
export function dialogOpen() {
  return document.querySelector('dialog[open]') !== null;
}

/** Opens a confirmation dialog; resolves to true when the person confirms. */
export function confirmDialog({ title, text, ok, items = [] }) {
  const dlg = $('dlg-confirm');
  $('dlg-confirm-title').textContent = title;
  $('confirm-text').textContent = text;
  $('confirm-ok').textContent = ok;
  fill($('confirm-list'), items.map((i) => el('li', {}, el('code', {}, i))));
  dlg.returnValue = '';
  dlg.showModal();
  return new Promise((resolve) => {
    dlg.addEventListener('close', () => resolve(dlg.returnValue === 'ok'), { once: true });
  });
}

/**
 * Shows a shell command in `node` (a `<pre>`): the same text, with each `--flag` in a span that
 * never breaks across lines, so narrow screens wrap between words, not inside a flag name.
 */
export function showCommand(node, command) {
  const parts = [];
  let word = '';
  let quoted = false;
  const flush = () => {
    if (word) parts.push(word.startsWith('--') ? el('span', { class: 'flag' }, word) : word);
    word = '';
  };
  for (let i = 0; i < command.length; i += 1) {
    const ch = command[i];
    if (ch === "'" && (quoted || command[i - 1] !== '\\')) quoted = !quoted;
    if (ch === ' ' && !quoted) {
      flush();
      parts.push(' ');
    } else {
      word += ch;
    }
  }
  flush();
  fill(node, parts);
}

/** Quotes a string for a POSIX shell. */
export function shellQuote(s) {
  return /^[A-Za-z0-9_./:=@%+,-]+$/.test(s) ? s : `'${s.replaceAll("'", "'\\''")}'`;
}

let bannerTimer = null;

/** Shows a message in the banner: errors stay until dismissed, news fades after a while. */
export function notify(message, kind = 'error') {
  const banner = $('banner');
  $('banner-text').textContent = message;
  banner.className = `banner ${kind}`;
  banner.setAttribute('role', kind === 'error' ? 'alert' : 'status');
  banner.hidden = false;
  clearTimeout(bannerTimer);
  if (kind !== 'error') bannerTimer = setTimeout(() => { banner.hidden = true; }, 6000);
}

/** Hides the banner unless it holds an error (navigation leaves errors up, news not). */
export function clearNews() {
  if ($('banner').classList.contains('error')) return;
  clearNotice();
}

/** Hides the banner. */
export function clearNotice() {
  clearTimeout(bannerTimer);
  $('banner').hidden = true;
}

const drawnOptions = new WeakMap();

/**
 * Fills a `<select>` with [value, label] options, keeping the selection when still there. An
 * unchanged list is left alone, so a live refresh never closes a list someone has open.
 */
export function options(select, pairs, keep = select.value) {
  const signature = JSON.stringify(pairs);
  if (drawnOptions.get(select) !== signature) {
    drawnOptions.set(select, signature);
    fill(select, pairs.map(([value, label]) => el('option', { value }, label)));
  }
  if (pairs.some(([value]) => value === keep)) select.value = keep;
}
