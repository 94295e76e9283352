// The secure tunnel page: search, the paginated live list, create, view, close, delete and
// batch operations.
import { api } from './api.js';
import {
  $, badge, bytes, confirmDialog, el, fields, fill, ms, notify, options, shellQuote, showCommand, showError, time,
} from './dom.js';
import { cell, copy, loadProducts, productName, productOptions, products } from './inventory.js';

const CLOSE_WARNING = 'Closing a secure tunnel immediately disconnects the client and the device. '
  + 'You cannot reopen the tunnel. This may cause service unavailability or affect your business. '
  + 'Proceed with caution.';

/** The search form's fields, also accepted in the page's location (`#/tunnels?state=OPEN`). */
const SEARCH_FIELDS = ['product_key', 'device_name', 'tunnel_id', 'state'];

const state = {
  filter: {},
  pageTokens: [''], // page_token of each page visited; [0] is the first page
  page: 0,
  next: null,
  rows: [],
  snapshot: '',
  selected: new Set(),
};

/** The tunnel page. */
export const tunnelsPage = {
  title: 'Secure tunnels',

  init() {
    const form = $('search-form');
    form.addEventListener('submit', (e) => {
      e.preventDefault();
      search(Object.fromEntries(new FormData(form)));
    });
    form.addEventListener('reset', () => setTimeout(() => search({})));
    $('page-prev').addEventListener('click', () => turn(-1));
    $('page-next').addEventListener('click', () => turn(1));
    $('page-size').addEventListener('change', () => search(state.filter));
    $('select-all').addEventListener('change', (e) => {
      for (const t of state.rows) toggle(t.tunnel_id, e.target.checked);
      render(true);
    });
    $('batch-close').addEventListener('click', () => batch('close'));
    $('batch-delete').addEventListener('click', () => batch('delete'));
    initCreate();
    $('result-copy').addEventListener('click', () => copy($('result-copied'), resultText));
    $('dlg-view').addEventListener('close', () => clearInterval(viewTimer));
  },

  async refresh(params) {
    await loadProducts();
    options($('search-product'), [['', 'All products'], ...productOptions()]);
    if (params && SEARCH_FIELDS.some((f) => params.has(f))) {
      // A link to a search (`#/tunnels?device_name=...`, from the devices page): apply it once.
      const filter = Object.fromEntries(SEARCH_FIELDS.map((f) => [f, params.get(f) ?? '']));
      for (const f of $('search-form').elements) if (f.name in filter) f.value = filter[f.name];
      history.replaceState(null, '', '#/tunnels');
      search(filter);
      return;
    }
    const r = await api.tunnels({
      ...state.filter,
      page_size: $('page-size').value,
      page_token: state.pageTokens[state.page],
    });
    if (r.tunnels.length === 0 && state.page > 0) {
      // The page emptied (deleted or closed away): step back.
      turn(-1);
      return;
    }
    state.rows = r.tunnels;
    state.next = r.next_page_token ?? null;
    render(false);
    $('refreshed').textContent = `Updated ${new Date().toLocaleTimeString()}`;
  },

  reset() {
    Object.assign(state, { filter: {}, pageTokens: [''], page: 0, next: null, rows: [], snapshot: '' });
    state.selected.clear();
    fill($('tunnel-rows'));
    for (const f of $('search-form').elements) if (f.name) f.value = '';
  },
};

function search(filter) {
  state.filter = filter;
  state.pageTokens = [''];
  state.page = 0;
  state.selected.clear();
  reload();
}

function turn(delta) {
  if (delta > 0 && state.next) {
    state.pageTokens[state.page + 1] = state.next;
    state.page += 1;
  } else if (delta < 0 && state.page > 0) {
    state.page -= 1;
  }
  state.selected.clear();
  reload();
}

function reload() {
  tunnelsPage.refresh().catch((err) => notify(err.display ?? err.message));
}

function toggle(id, on) {
  if (on) state.selected.add(id);
  else state.selected.delete(id);
}

/** One side's connection: state and, while connected, the last ping RTT. */
function peer(p) {
  const up = p.state === 'CONNECTED';
  return el('span', { class: 'peer' }, badge(p.state, up ? 'ok' : 'off'),
    up && p.rtt_ms !== null && p.rtt_ms !== undefined ? el('span', { class: 'rtt' }, `RTT ${ms(p.rtt_ms)}`) : null);
}

/** Draws the rows, unless nothing changed; keeps keyboard focus on the same control. */
function render(force) {
  const visible = new Set(state.rows.map((t) => t.tunnel_id));
  for (const id of state.selected) if (!visible.has(id)) state.selected.delete(id);
  const snapshot = JSON.stringify([state.rows, [...state.selected], products]);
  if (force || snapshot !== state.snapshot) {
    state.snapshot = snapshot;
    const focused = document.activeElement?.dataset?.focus;
    fill($('tunnel-rows'), state.rows.map(row));
    if (focused) document.querySelector(`[data-focus="${CSS.escape(focused)}"]`)?.focus();
  }
  $('tunnel-empty').hidden = state.rows.length > 0;
  const n = state.selected.size;
  $('selected-count').textContent = `${n} selected`;
  $('batch-close').disabled = n === 0;
  $('batch-delete').disabled = n === 0;
  const all = $('select-all');
  all.checked = n > 0 && n === state.rows.length;
  all.indeterminate = n > 0 && n < state.rows.length;
  $('page-number').textContent = `Page ${state.page + 1}`;
  $('page-prev').disabled = state.page === 0;
  $('page-next').disabled = !state.next;
}

function row(t) {
  const id = t.tunnel_id;
  const open = t.state === 'OPEN';
  return el('tr', { 'data-id': id, 'data-state': t.state },
    el('td', { class: 'check' }, el('input', {
      type: 'checkbox',
      'aria-label': `Select tunnel ${id}`,
      'data-focus': `${id}:select`,
      checked: state.selected.has(id),
      onchange: (e) => { toggle(id, e.target.checked); render(true); },
    })),
    cell('Tunnel ID', el('code', { class: 'id' }, id)),
    cell('Product', productName(t.product_key), el('br'), el('code', { class: 'muted' }, t.product_key)),
    cell('Device', t.device_name),
    cell('State', badge(t.state, open ? 'ok' : 'off')),
    cell('Device connection', peer(t.device)),
    cell('Client connection', peer(t.client)),
    cell('Created', time(t.created_at)),
    cell('Actions', el('span', { class: 'row-actions' },
      el('button', {
        type: 'button', class: 'link', 'aria-label': `View tunnel ${id}`, 'data-focus': `${id}:view`, onclick: () => openView(id),
      }, 'View'),
      open ? el('button', {
        type: 'button', class: 'link danger', 'aria-label': `Close Tunnel ${id}`, 'data-focus': `${id}:close`, onclick: () => closeOne(id),
      }, 'Close Tunnel') : null,
      open ? null : el('button', {
        type: 'button', class: 'link danger', 'aria-label': `Delete tunnel ${id}`, 'data-focus': `${id}:delete`, onclick: () => deleteOne(id),
      }, 'Delete'),
    )),
  );
}

async function closeOne(id) {
  if (!await confirmDialog({ title: 'Close Tunnel', text: CLOSE_WARNING, ok: 'Close Tunnel', items: [id] })) return;
  try {
    await api.closeTunnel(id);
    notify(`Tunnel ${id} closed.`, 'info');
  } catch (err) {
    notify(`Could not close tunnel ${id}: ${err.display ?? err.message}`);
  }
  reload();
}

async function deleteOne(id) {
  const text = 'The closed tunnel and its record are deleted for good.';
  if (!await confirmDialog({ title: 'Delete Tunnel', text, ok: 'Delete', items: [id] })) return;
  try {
    await api.deleteTunnel(id);
    notify(`Tunnel ${id} deleted.`, 'info');
  } catch (err) {
    notify(`Could not delete tunnel ${id}: ${err.display ?? err.message}`);
  }
  reload();
}

async function batch(kind) {
  const ids = state.rows.map((t) => t.tunnel_id).filter((id) => state.selected.has(id));
  const close = kind === 'close';
  const ok = await confirmDialog(close
    ? { title: 'Batch Close Tunnels', text: `${CLOSE_WARNING} Only OPEN tunnels can be closed.`, ok: 'Close Tunnels', items: ids }
    : { title: 'Batch Delete Tunnels', text: 'The tunnels are deleted for good. Only CLOSED tunnels can be deleted.', ok: 'Delete Tunnels', items: ids });
  if (!ok) return;
  try {
    const { results } = close ? await api.batchClose(ids) : await api.batchDelete(ids);
    const done = close ? 'Closed' : 'Deleted';
    fill($('batch-rows'), results.map((r) => el('tr', { 'data-id': r.tunnel_id, 'data-ok': String(r.ok) },
      el('td', {}, el('code', { class: 'id' }, r.tunnel_id)),
      el('td', {}, r.ok ? badge(done, 'ok') : badge('Failed', 'bad'), r.ok ? null : ` ${r.error?.message ?? 'unknown error'}`),
    )));
    const n = results.filter((r) => r.ok).length;
    $('dlg-batch-title').textContent = close ? 'Batch Close Tunnels: results' : 'Batch Delete Tunnels: results';
    $('batch-summary').textContent = `${n} of ${results.length} ${close ? 'closed' : 'deleted'}.`;
    state.selected.clear();
    $('dlg-batch').showModal();
  } catch (err) {
    notify(`Batch ${kind} failed: ${err.display ?? err.message}`);
  }
  reload();
}

// ---- Create Secure Tunnel ----

function initCreate() {
  $('create-tunnel').addEventListener('click', openCreate);
  $('create-product').addEventListener('change', loadDevices);
  $('create-refresh').addEventListener('click', loadDevices);
  $('create-form').addEventListener('submit', async (e) => {
    e.preventDefault();
    const form = e.target;
    const v = Object.fromEntries(new FormData(form));
    const spec = { product_key: v.product_key, device_name: v.device_name };
    if (v.custom_info) spec.custom_info = v.custom_info;
    if (v.description) spec.description = v.description;
    const services = v.services.split(',').map((s) => s.trim()).filter(Boolean);
    if (services.length) spec.services = services;
    if (v.lifetime) spec.lifetime_seconds = Number(v.lifetime) * 60;
    showError($('create-error'), '');
    $('create-ok').disabled = true;
    try {
      const created = await api.createTunnel(spec);
      form.reset();
      $('dlg-create').close();
      showResult(created, spec.services ?? ['SSH']);
      reload();
    } catch (err) {
      showError($('create-error'), err.display ?? err.message);
    } finally {
      $('create-ok').disabled = false;
    }
  });
}

async function openCreate() {
  showError($('create-error'), '');
  $('dlg-create').showModal();
  try {
    await loadProducts();
    options($('create-product'), productOptions(), state.filter.product_key || $('create-product').value);
    await loadDevices();
  } catch (err) {
    showError($('create-error'), err.display ?? err.message);
  }
}

/** Lists the selected product's online devices; says why when there is none. */
async function loadDevices() {
  const pk = $('create-product').value;
  const select = $('create-device');
  const why = $('create-device-why');
  let online = [];
  let total = 0;
  if (!pk) {
    why.textContent = 'No product yet: create a product and a device first (Products and Devices pages).';
  } else {
    try {
      const devices = await api.devices(pk);
      total = devices.length;
      online = devices.filter((d) => d.online).map((d) => d.device_name);
    } catch (err) {
      showError($('create-error'), err.display ?? err.message);
    }
    if (total === 0) why.textContent = 'This product has no devices yet: create one on the Devices page.';
    else if (online.length === 0) {
      const none = total === 1 ? "This product's device is not online." : `None of this product's ${total} devices is online.`;
      why.textContent = `${none} A device is online while its agent (iotunnel device) keeps its device `
        + 'channel to this server connected. Start it, then Refresh.';
    } else why.textContent = `Only online devices are listed (${online.length} of ${total}).`;
  }
  options(select, online.length ? online.map((n) => [n, n]) : [['', 'No online device']]);
  select.disabled = online.length === 0;
  $('create-ok').disabled = online.length === 0;
}

let resultText = '';

/** The one-time result of a create: token, URL, endpoint and a client command. */
function showResult(t, services) {
  const listen = services.length === 1
    ? ['--listen 127.0.0.1:2222']
    : services.map((s, i) => `--listen ${shellQuote(`${s}=127.0.0.1:${2222 + i}`)}`);
  const command = [`IOTUNNEL_TOKEN=${shellQuote(t.client_token)} iotunnel client`,
    `--url ${shellQuote(t.client_url)}`, ...listen].join(' ');
  fields($('result-fields'), [
    ['Tunnel ID', el('code', { id: 'result-id' }, t.tunnel_id)],
    ['Client token', el('code', { id: 'result-token', class: 'secret' }, t.client_token)],
    ['Client URL', el('code', { id: 'result-url' }, t.client_url)],
    ['Client endpoint', el('code', { id: 'result-endpoint' }, t.client_endpoint)],
    ['Expires', time(t.expires_at)],
  ]);
  showCommand($('result-command'), command);
  resultText = [`Tunnel ID: ${t.tunnel_id}`, `Client token: ${t.client_token}`, `Client URL: ${t.client_url}`,
    `Client endpoint: ${t.client_endpoint}`, `Client command: ${command}`, ''].join('\n');
  $('result-copied').textContent = '';
  $('dlg-result').showModal();
}

// ---- View ----

let viewTimer = null;

async function openView(id) {
  const dlg = $('dlg-view');
  fill($('view-fields'));
  fill($('view-device'));
  fill($('view-client'));
  showError($('view-error'), '');
  dlg.showModal();
  const draw = async () => {
    try {
      drawView(await api.tunnel(id));
      showError($('view-error'), '');
    } catch (err) {
      showError($('view-error'), err.display ?? err.message);
    }
  };
  clearInterval(viewTimer);
  viewTimer = setInterval(() => { if (dlg.open) draw(); }, 2000);
  await draw();
}

function drawView(t) {
  fields($('view-fields'), [
    ['Tunnel ID', el('code', {}, t.tunnel_id)],
    ['Product', `${productName(t.product_key)} (${t.product_key})`],
    ['Device', t.device_name],
    ['State', badge(t.state, t.state === 'OPEN' ? 'ok' : 'off')],
    ['Services', t.services.join(', ')],
    ['Description', t.description ? el('span', { class: 'text' }, t.description) : null, { 'data-field': 'description' }],
    ['Custom information', t.custom_info ? el('pre', { class: 'text' }, t.custom_info) : null, { 'data-field': 'custom_info' }],
    ['Created', time(t.created_at)],
    ['Expires', time(t.expires_at)],
    ['Closed', time(t.closed_at)],
    ['Close reason', t.close_reason],
  ]);
  for (const side of ['device', 'client']) {
    const p = t[side];
    fields($(`view-${side}`), [
      ['State', badge(p.state, p.state === 'CONNECTED' ? 'ok' : 'off'), { 'data-field': `${side}-state` }],
      ['Since', time(p.updated_at)],
      ['RTT', ms(p.rtt_ms), { 'data-field': `${side}-rtt` }],
      ['Smoothed RTT', ms(p.smoothed_rtt_ms)],
      ['Address', p.address],
      ['Bytes sent', bytes(p.bytes_sent)],
      ['Bytes received', bytes(p.bytes_received)],
    ]);
  }
}
