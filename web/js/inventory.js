// The products and devices pages, and the product list other pages share.
import { api } from './api.js';
import {
  $, badge, confirmDialog, copyText, el, fields, fill, notify, options, shellQuote, showCommand, showError, time,
} from './dom.js';

/** The account's products, as last loaded. */
export let products = [];

/** Loads the products (and keeps them for the other pages). */
export async function loadProducts() {
  products = await api.products();
  return products;
}

/** A product's display name, or its key when unknown. */
export function productName(key) {
  const p = products.find((x) => x.product_key === key);
  return p ? p.name : key;
}

/** [value, label] pairs for a product `<select>`. */
export function productOptions() {
  return products.map((p) => [p.product_key, `${p.name} (${p.product_key})`]);
}

/** A table cell that shows its column name when the table turns into cards (narrow screens). */
export const cell = (label, ...children) => el('td', { 'data-label': label }, el('div', {}, ...children));

let lastProducts = '';

/** The products page. */
export const productsPage = {
  title: 'Products',

  init() {
    $('product-form').addEventListener('submit', async (e) => {
      e.preventDefault();
      const input = $('product-name');
      showError($('product-error'), '');
      try {
        const p = await api.createProduct(input.value);
        input.value = '';
        notify(`Product "${p.name}" created: ${p.product_key}`, 'info');
        await this.refresh();
      } catch (err) {
        showError($('product-error'), err.display ?? err.message);
      }
    });
  },

  async refresh() {
    await loadProducts();
    const snapshot = JSON.stringify(products);
    if (snapshot === lastProducts) return;
    lastProducts = snapshot;
    fill($('product-rows'), products.map((p) => el('tr', { 'data-key': p.product_key },
      cell('Name', p.name),
      cell('Product key', el('code', {}, p.product_key)),
      cell('Created', time(p.created_at)),
      cell('Actions', el('a', { href: `#/devices?product=${encodeURIComponent(p.product_key)}` }, 'Devices')),
    )));
    $('product-empty').hidden = products.length > 0;
  },

  reset() {
    lastProducts = '';
    fill($('product-rows'));
  },
};

let lastDevices = '';

/** The devices page: a product's devices with their online status. */
export const devicesPage = {
  title: 'Devices',

  init() {
    $('device-product').addEventListener('change', () => {
      history.replaceState(null, '', `#/devices?product=${encodeURIComponent($('device-product').value)}`);
      this.refresh().catch((err) => notify(err.display ?? err.message));
    });
    $('device-form').addEventListener('submit', async (e) => {
      e.preventDefault();
      const pk = $('device-product').value;
      const input = $('device-name');
      showError($('device-error'), '');
      try {
        const d = await api.createDevice(pk, input.value);
        input.value = '';
        showSecret(d);
        await this.refresh();
      } catch (err) {
        showError($('device-error'), err.display ?? err.message);
      }
    });
    $('secret-copy').addEventListener('click', () => copy($('secret-copied'), secretText));
  },

  async refresh(params) {
    await loadProducts();
    const select = $('device-product');
    const wanted = params?.get('product') || select.value;
    options(select, productOptions(), wanted);
    showError($('device-error'), products.length ? '' : 'Create a product first (Products page).');
    if (!select.value) {
      fill($('device-rows'));
      $('device-empty').hidden = true;
      return;
    }
    const devices = await api.devices(select.value);
    const snapshot = JSON.stringify(devices);
    if (snapshot === lastDevices) return;
    lastDevices = snapshot;
    const focused = document.activeElement?.dataset?.focus;
    fill($('device-rows'), devices.map((d) => deviceRow(d, () => this.refresh())));
    if (focused) document.querySelector(`[data-focus="${CSS.escape(focused)}"]`)?.focus();
    $('device-empty').hidden = devices.length > 0;
  },

  reset() {
    lastDevices = '';
    fill($('device-rows'));
  },
};

/** A device's row: online state, its OPEN tunnels (a link to them) and Delete. */
function deviceRow(d, reload) {
  const name = d.device_name;
  const open = d.open_tunnels ?? 0;
  const search = new URLSearchParams({ product_key: d.product_key, device_name: name, state: 'OPEN' });
  return el('tr', { 'data-device': name },
    cell('Device name', name),
    cell('Status', d.online ? badge('Online', 'ok') : badge('Offline', 'off')),
    cell('Open tunnels', open === 0 ? el('span', { class: 'muted', 'data-open': '0' }, 'None')
      : el('a', { href: `#/tunnels?${search}`, 'data-open': String(open), 'aria-label': `Open tunnels of ${name}` },
        `${open} open`)),
    cell('Created', time(d.created_at)),
    cell('Actions', el('span', { class: 'row-actions' }, el('button', {
      type: 'button',
      class: 'link danger',
      'aria-label': `Delete device ${name}`,
      'data-focus': `${name}:delete`,
      onclick: () => deleteDevice(d, reload),
    }, 'Delete'))),
  );
}

/** Deletes a device after the same kind of confirmation as closing a tunnel. */
async function deleteDevice(d, reload) {
  const name = d.device_name;
  const open = d.open_tunnels ?? 0;
  const tunnels = open === 1 ? 'its open tunnel' : `its ${open} open tunnels`;
  const text = `Deleting the device removes it and its secret for good${open ? ` and closes ${tunnels} at once, `
    + 'disconnecting their clients' : ''}. Its agent is told and stops. You cannot undo this; the same name `
    + 'can be created again later with a new secret.';
  if (!await confirmDialog({ title: 'Delete Device', text, ok: 'Delete Device', items: [name] })) return;
  try {
    await api.deleteDevice(d.product_key, name);
    notify(`Device ${name} deleted${open ? `; ${open === 1 ? '1 tunnel' : `${open} tunnels`} closed` : ''}.`, 'info');
  } catch (err) {
    notify(`Could not delete device ${name}: ${err.display ?? err.message}`);
  }
  await reload().catch((err) => notify(err.display ?? err.message));
}

let secretText = '';

/** The one-time view of a new device's secret, with the agent command. */
function showSecret(d) {
  fields($('secret-fields'), [
    ['Product key', el('code', {}, d.product_key)],
    ['Device name', el('code', {}, d.device_name)],
    ['Device secret', el('code', { id: 'secret-value', class: 'secret' }, d.device_secret)],
  ]);
  const command = `IOTUNNEL_DEVICE_SECRET=${shellQuote(d.device_secret)} iotunnel device --api ${shellQuote(location.origin)}`
    + ` --product-key ${shellQuote(d.product_key)} --device-name ${shellQuote(d.device_name)}`
    // The relay's certificate comes from the server's own CA: the agent must trust it.
    + ' --ca-file iotunnel-data/tls/ca.pem';
  showCommand($('secret-command'), command);
  secretText = `Product key: ${d.product_key}\nDevice name: ${d.device_name}\nDevice secret: ${d.device_secret}\n`
    + `Device agent: ${command}\n`;
  $('secret-copied').textContent = '';
  $('dlg-secret').showModal();
}

/** Copies `text`, reporting the outcome in `status`. */
export async function copy(status, text) {
  try {
    await copyText(text);
    status.textContent = 'Copied to the clipboard.';
  } catch (err) {
    status.textContent = `Could not copy: ${err.message}`;
  }
}
