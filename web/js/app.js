// The console's entry point: sign-in, navigation between pages and the live refresh.
import { apiKey, call, forgetApiKey, setApiKey, setUnauthorizedHandler } from './api.js';
import { $, clearNews, clearNotice, dialogOpen, notify, showError, wireDialogs } from './dom.js';
import { devicesPage, productsPage } from './inventory.js';
import { tunnelsPage } from './tunnels.js';

/** How often the visible page is reloaded: the list is live without hammering the API. */
const REFRESH_MS = 2500;

const pages = { tunnels: tunnelsPage, products: productsPage, devices: devicesPage };
let current = null;
let refreshing = false;

/** The page named by the location hash (`#/devices?product=...`) and its parameters. */
function currentRoute() {
  const [path, query = ''] = window.location.hash.replace(/^#\/?/, '').split('?');
  return { name: pages[path] ? path : 'tunnels', params: new URLSearchParams(query) };
}

function showOnly(id) {
  for (const s of document.querySelectorAll('.page')) s.hidden = s.id !== id;
}

async function refresh(params) {
  if (!current || refreshing) return;
  refreshing = true;
  try {
    await current.refresh(params);
  } catch (err) {
    if (err.status !== 401) notify(err.display ?? err.message);
  } finally {
    refreshing = false;
  }
}

function route() {
  const signedIn = apiKey() !== null;
  $('nav').hidden = !signedIn;
  $('sign-out').hidden = !signedIn;
  if (!signedIn) {
    current = null;
    showOnly('page-signin');
    document.title = 'Sign in · iotunnel';
    $('signin-key').focus();
    return;
  }
  const { name, params } = currentRoute();
  const page = pages[name];
  const changed = page !== current;
  current = page;
  showOnly(`page-${name}`);
  document.title = `${page.title} · iotunnel`;
  for (const a of $('nav').querySelectorAll('a')) {
    if (a.dataset.page === name) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
  if (changed) {
    // News belongs to the page it was about; errors stay until dismissed.
    clearNews();
    $('main').focus({ preventScroll: true });
  }
  refreshing = false;
  refresh(params);
}

/** Forgets the key and shows the sign-in page: with `error` when the server refused the key. */
function signOut(error) {
  forgetApiKey();
  for (const dlg of document.querySelectorAll('dialog[open]')) dlg.close();
  for (const page of Object.values(pages)) page.reset();
  clearNotice();
  $('signin-key').value = '';
  showError($('signin-error'), error);
  showError($('signin-status'), error ? '' : 'You are signed out. The API key was forgotten in this tab.');
  route();
}

$('signin-form').addEventListener('submit', async (e) => {
  e.preventDefault();
  const key = $('signin-key').value.trim();
  showError($('signin-error'), '');
  showError($('signin-status'), '');
  try {
    // Any authenticated read proves the key.
    await call('GET', '/v1/products', undefined, key);
  } catch (err) {
    showError($('signin-error'), `Sign-in failed: ${err.display ?? err.message}`);
    return;
  }
  setApiKey(key);
  $('signin-key').value = '';
  route();
});

$('sign-out').addEventListener('click', () => signOut(''));
$('banner-close').addEventListener('click', clearNotice);
setUnauthorizedHandler((err) => signOut(`Signed out: the server refused the API key (${err.message}).`));
window.addEventListener('hashchange', route);
wireDialogs();
for (const page of Object.values(pages)) page.init();
route();

setInterval(() => {
  if (current && !dialogOpen() && document.visibilityState === 'visible') refresh();
}, REFRESH_MS);
