// The control API client: JSON over fetch with the signed-in API key. Every failure becomes an
// ApiError carrying the server's message, so callers can always show it.

const KEY = 'iotunnel.apiKey';

/** An API or network failure, with the message to show. */
export class ApiError extends Error {
  constructor(status, code, message, requestId) {
    super(message);
    this.status = status;
    this.code = code;
    this.requestId = requestId;
  }

  /** The message, with the request id the server logged it under. */
  get display() {
    return this.requestId ? `${this.message} (request ${this.requestId})` : this.message;
  }
}

/** The API key of this tab, or null. Kept in sessionStorage only. */
export function apiKey() {
  return sessionStorage.getItem(KEY);
}

export function setApiKey(key) {
  sessionStorage.setItem(KEY, key);
}

export function forgetApiKey() {
  sessionStorage.removeItem(KEY);
}

/** Called on 401, set by the app (it signs out). */
let onUnauthorized = () => {};
export function setUnauthorizedHandler(fn) {
  onUnauthorized = fn;
}

/** Calls the API; resolves to the JSON body (null when empty), rejects with ApiError. */
export async function call(method, path, body, key = apiKey()) {
  const headers = { Accept: 'application/json' };
  if (key) headers.Authorization = `Bearer ${key}`;
  const init = { method, headers, cache: 'no-store', credentials: 'omit' };
  if (body !== undefined) {
    headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch(path, init);
  } catch (e) {
    throw new ApiError(0, 'network', `Cannot reach the server: ${e.message}`);
  }
  const text = await resp.text();
  let json = null;
  if (text) {
    try {
      json = JSON.parse(text);
    } catch {
      json = null;
    }
  }
  if (resp.ok) return json;
  const err = json && json.error;
  const error = err
    ? new ApiError(resp.status, err.code, err.message, err.request_id)
    : new ApiError(resp.status, 'http', `HTTP ${resp.status} ${resp.statusText}`.trim());
  if (resp.status === 401 && key === apiKey()) onUnauthorized(error);
  throw error;
}

const q = (params) => {
  const s = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v) s.set(k, v);
  const text = s.toString();
  return text ? `?${text}` : '';
};
const seg = encodeURIComponent;

export const api = {
  products: () => call('GET', '/v1/products').then((r) => r.products),
  createProduct: (name) => call('POST', '/v1/products', { name }),
  devices: (pk) => call('GET', `/v1/products/${seg(pk)}/devices`).then((r) => r.devices),
  createDevice: (pk, name) => call('POST', `/v1/products/${seg(pk)}/devices`, { name }),
  deleteDevice: (pk, name) => call('DELETE', `/v1/products/${seg(pk)}/devices/${seg(name)}`),
  tunnels: (filter) => call('GET', `/v1/tunnels${q(filter)}`),
  tunnel: (id) => call('GET', `/v1/tunnels/${seg(id)}`),
  createTunnel: (spec) => call('POST', '/v1/tunnels', spec),
  closeTunnel: (id) => call('POST', `/v1/tunnels/${seg(id)}/close`),
  deleteTunnel: (id) => call('DELETE', `/v1/tunnels/${seg(id)}`),
  batchClose: (ids) => call('POST', '/v1/tunnels/batch-close', { tunnel_ids: ids }),
  batchDelete: (ids) => call('POST', '/v1/tunnels/batch-delete', { tunnel_ids: ids }),
};
