// ouro console: plain JavaScript, no framework, no build step. It only calls
// ouro's HTTP API; the admin key and API key live in sessionStorage.
'use strict';

const $ = (sel) => document.querySelector(sel);
const el = (tag, attrs = {}, ...kids) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'class') e.className = v;
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null) e.setAttribute(k, v);
  }
  for (const k of kids) if (k !== null && k !== undefined) e.append(k.nodeType ? k : String(k));
  return e;
};
const fmt = (x, d = 2) => (x === null || x === undefined || Number.isNaN(x) ? '—' : Number(x).toFixed(d));

// ---------------------------------------------------------------- keys
const KEYS = { admin: 'ouro.adminKey', api: 'ouro.apiKey' };
const getKey = (k) => sessionStorage.getItem(KEYS[k]) || '';
function showKeys() {
  const a = getKey('admin'), p = getKey('api');
  $('#keys-state').textContent = `admin key ${a ? 'set' : 'not set'} · API key ${p ? 'set' : 'not set'}`;
}
$('#keys-save').addEventListener('click', () => {
  for (const [k, id] of [['admin', '#admin-key'], ['api', '#api-key']]) {
    const v = $(id).value.trim();
    if (v) sessionStorage.setItem(KEYS[k], v); else sessionStorage.removeItem(KEYS[k]);
    $(id).value = '';
  }
  showKeys();
  pollLearning();
});
$('#keys-clear').addEventListener('click', () => {
  sessionStorage.removeItem(KEYS.admin); sessionStorage.removeItem(KEYS.api);
  showKeys();
  pollLearning();
});

// ---------------------------------------------------------------- HTTP
class HttpError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}
// The key a request sends: the admin API takes the admin key; changing an
// experience library needs the admin key (or an API key with scope
// experiences:write), so it prefers the admin key; everything else prefers
// the API key. The server accepts the admin key wherever an API key goes.
function keyFor(path, method) {
  const admin = getKey('admin'), apiKey = getKey('api');
  if (path.startsWith('/admin/')) return admin;
  const libraryWrite = method !== 'GET' && path.startsWith('/v1/experiences');
  return libraryWrite ? (admin || apiKey) : (apiKey || admin);
}
function headersFor(path, json, method = 'GET') {
  const h = {};
  if (json) h['content-type'] = 'application/json';
  const key = keyFor(path, method);
  if (key) h.authorization = `Bearer ${key}`;
  return h;
}
async function errorOf(r) {
  let m = r.statusText;
  try { const b = await r.json(); m = (b.error && b.error.message) || JSON.stringify(b); } catch (_) { /* not JSON */ }
  return new HttpError(r.status, m);
}
async function api(method, path, body) {
  const r = await fetch(path, { method, headers: headersFor(path, body !== undefined, method), body: body === undefined ? undefined : JSON.stringify(body) });
  if (!r.ok) throw await errorOf(r);
  const t = await r.text();
  return t ? JSON.parse(t) : null;
}
function showMsg(sel, ok, text) {
  const m = $(sel);
  m.className = `msg ${ok ? 'ok' : 'error'}`;
  m.textContent = text;
}
function refusal(e) {
  if (e.status === 401) return `Refused (401): ${e.message}. Enter the key above and press "Use keys".`;
  if (e.status === 403) return `Refused (403): ${e.message}`;
  return e.status ? `Failed (${e.status}): ${e.message}` : `Failed: ${e.message}`;
}

// ---------------------------------------------------------------- tabs
let currentView = 'chat';
for (const b of document.querySelectorAll('#tabs button')) {
  b.addEventListener('click', () => showView(b.dataset.view));
}
function showView(v) {
  currentView = v;
  for (const b of document.querySelectorAll('#tabs button')) b.classList.toggle('active', b.dataset.view === v);
  for (const s of document.querySelectorAll('.view')) s.classList.toggle('active', s.id === `view-${v}`);
  location.hash = v;
  if (v === 'experiences') loadLibraries();
  if (v === 'learning') { pollMetrics(); pollLearning(); }
  if (v === 'load') pollMetrics();
}

// ---------------------------------------------------------------- chat
const conversation = [];
let chatAbort = null;
$('#chat-clear').addEventListener('click', () => { conversation.length = 0; $('#chat-log').textContent = ''; });
$('#chat-input').addEventListener('keydown', (e) => { if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) { e.preventDefault(); sendChat(); } });
$('#chat-form').addEventListener('submit', (e) => { e.preventDefault(); sendChat(); });
$('#chat-stop').addEventListener('click', () => { if (chatAbort) chatAbort.abort(); });

function addTurn(role, text) {
  const t = el('div', { class: `turn ${role}` }, el('div', { class: 'who' }, role === 'user' ? 'you' : 'assistant'), el('div', { class: 'text' }, text));
  $('#chat-log').append(t);
  $('#chat-log').scrollTop = $('#chat-log').scrollHeight;
  return t;
}

// Reads server-sent events from a fetch() body; calls onData with each parsed `data:` payload.
async function readSse(response, onData) {
  const reader = response.body.getReader();
  const dec = new TextDecoder();
  let buf = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += dec.decode(value, { stream: true });
    let i;
    while ((i = buf.search(/\r?\n\r?\n/)) >= 0) {
      const ev = buf.slice(0, i);
      buf = buf.slice(i).replace(/^\r?\n\r?\n/, '');
      const data = ev.split(/\r?\n/).filter((l) => l.startsWith('data:')).map((l) => l.slice(5).replace(/^ /, '')).join('\n');
      if (!data) continue;
      if (data === '[DONE]') return;
      onData(JSON.parse(data));
    }
  }
}

async function sendChat() {
  const text = $('#chat-input').value.trim();
  if (!text || chatAbort) return;
  $('#chat-input').value = '';
  addTurn('user', text);
  conversation.push({ role: 'user', content: text });
  const turn = addTurn('assistant', '');
  turn.classList.add('answer');
  const out = turn.querySelector('.text');
  const stats = el('div', { class: 'stats' }, 'waiting…');
  turn.append(stats);
  const body = {
    messages: conversation.slice(),
    stream: true,
    stream_options: { include_usage: true },
    temperature: Number($('#chat-temp').value),
    max_tokens: Number($('#chat-max').value),
  };
  const exp = $('#chat-exp').value;
  if (exp) body.ouro = { experience: exp };
  chatAbort = new AbortController();
  $('#chat-send').disabled = true; $('#chat-stop').disabled = false;
  const t0 = performance.now();
  let tFirst = null, tokens = 0, drafted = { ngram: 0, speculator: 0 }, answer = '', finish = null, usage = null, experience = null;
  try {
    const r = await fetch('/v1/chat/completions', { method: 'POST', headers: headersFor('/v1/chat/completions', true, 'POST'), body: JSON.stringify(body), signal: chatAbort.signal });
    if (!r.ok) throw await errorOf(r);
    await readSse(r, (c) => {
      if (c.error) throw new Error(c.error.message);
      if (c.usage) usage = c.usage;
      if (c.ouro && c.ouro.experience) experience = c.ouro.experience;
      const ch = c.choices && c.choices[0];
      if (!ch) return;
      if (ch.delta && ch.delta.content) {
        if (tFirst === null) tFirst = performance.now();
        tokens += 1;
        const by = c.ouro && c.ouro.drafted_by;
        if (by) drafted[by] = (drafted[by] || 0) + 1;
        out.append(el('span', { class: `tok tok-${by || 'target'}`, title: by ? `drafted by ${by}, accepted` : 'target model' }, ch.delta.content));
        answer += ch.delta.content;
        stats.textContent = `${tokens} chunks…`;
        $('#chat-log').scrollTop = $('#chat-log').scrollHeight;
      }
      if (ch.finish_reason) finish = { reason: ch.finish_reason, ouro: c.ouro };
    });
    conversation.push({ role: 'assistant', content: answer });
    const t1 = performance.now();
    const n = usage ? usage.completion_tokens : tokens;
    const spec = finish && finish.ouro && finish.ouro.spec;
    const timing = finish && finish.ouro && finish.ouro.timing_ms;
    const decodeMs = timing ? timing.total - timing.ttft : (t1 - (tFirst || t0));
    const tps = n > 1 && decodeMs > 0 ? (n - 1) / (decodeMs / 1000) : null;
    stats.textContent = '';
    stats.append(
      el('b', {}, `${fmt(tps, 1)} tok/s`), ` · ${n} tokens`,
      timing ? ` · TTFT ${fmt(timing.ttft, 0)} ms` : '',
      ' · mean acceptance length ', el('b', { class: 'mal' }, spec ? fmt(spec.mean_acceptance_length, 2) : '—'),
      ' · drafter ', el('b', { class: 'drafter' }, (spec && spec.drafter) || 'none'),
      spec ? ` (${spec.accepted}/${spec.drafted} drafts accepted)` : '',
      experience ? ` · experience ${experience.name} v${experience.version}` : '',
      finish ? ` · ${finish.reason}` : '',
    );
    turn.dataset.done = '1';
  } catch (e) {
    stats.textContent = '';
    stats.append(el('span', { class: 'msg error', style: 'display:inline-block' }, e.name === 'AbortError' ? 'stopped' : refusal(e)));
    turn.dataset.done = 'error';
  } finally {
    chatAbort = null;
    $('#chat-send').disabled = false; $('#chat-stop').disabled = true;
  }
}

// ---------------------------------------------------------------- metrics
// Parses Prometheus text into [{name, labels, value}].
function parseMetrics(text) {
  const out = [];
  for (const line of text.split('\n')) {
    if (!line || line.startsWith('#')) continue;
    const m = line.match(/^([a-zA-Z_:][\w:]*)(\{([^}]*)\})?\s+(\S+)/);
    if (!m) continue;
    const labels = {};
    if (m[3]) for (const p of m[3].matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[p[1]] = p[2];
    out.push({ name: m[1], labels, value: Number(m[4]) });
  }
  return out;
}
const sum = (ms, name, pred = () => true) => ms.filter((m) => m.name === name && pred(m.labels)).reduce((a, m) => a + m.value, 0);
const has = (ms, name) => ms.some((m) => m.name === name);

const HISTORY = 300; // points kept per series
const series = { acceptance: [], tps: [], kv: [], running: [], waiting: [] };
let lastSample = null;
let specHistory = [];
const push = (s, p) => { s.push(p); if (s.length > HISTORY) s.shift(); };

async function pollMetrics() {
  let ms;
  try {
    // The API key too: the server may protect /metrics with it.
    const r = await fetch('/metrics', { headers: headersFor('/metrics', false) });
    if (!r.ok) throw await errorOf(r);
    ms = parseMetrics(await r.text());
  } catch (e) { $('#status-line').textContent = `metrics unavailable: ${refusal(e)}`; return; }
  const now = Date.now() / 1000;
  const sample = {
    t: now,
    gen: sum(ms, 'ouro_generation_tokens_total'),
    drafts: sum(ms, 'ouro_spec_decode_num_drafts_total'),
    accepted: sum(ms, 'ouro_spec_decode_num_accepted_tokens_total'),
    decodeSeconds: sum(ms, 'ouro_request_decode_time_seconds_sum'),
    decodeTokens: sum(ms, 'ouro_request_generation_tokens_sum'),
    decodeRequests: sum(ms, 'ouro_request_decode_time_seconds_count'),
  };
  // Mean acceptance length: over the last interval when there was drafting, else cumulative.
  if (lastSample && sample.drafts > lastSample.drafts) {
    const d = sample.drafts - lastSample.drafts;
    push(series.acceptance, { t: now, v: (d + sample.accepted - lastSample.accepted) / d });
  } else if (sample.drafts > 0) {
    push(series.acceptance, { t: now, v: (sample.drafts + sample.accepted) / sample.drafts });
  }
  // Decode tokens/s of the requests that finished since the last poll: their
  // tokens after the first over their decode time (first token to last).
  if (lastSample && sample.decodeSeconds > lastSample.decodeSeconds) {
    const tokens = sample.decodeTokens - lastSample.decodeTokens - (sample.decodeRequests - lastSample.decodeRequests);
    push(series.tps, { t: now, v: Math.max(0, tokens) / (sample.decodeSeconds - lastSample.decodeSeconds) });
  }
  lastSample = sample;
  const kv = sum(ms, 'ouro_kv_cache_usage_perc'), running = sum(ms, 'ouro_num_requests_running'), waiting = sum(ms, 'ouro_num_requests_waiting');
  push(series.kv, { t: now, v: kv * 100 });
  push(series.running, { t: now, v: running });
  push(series.waiting, { t: now, v: waiting });
  $('#kv-usage').textContent = has(ms, 'ouro_kv_cache_usage_perc') ? `${(kv * 100).toFixed(1)} %` : '—';
  $('#kv-bar').style.width = `${Math.min(100, kv * 100)}%`;
  $('#req-running').textContent = String(running);
  $('#req-waiting').textContent = String(waiting);
  $('#gen-total').textContent = String(sample.gen);
  $('#status-line').textContent = `last poll ${new Date().toLocaleTimeString()} · speculator v${sum(ms, 'ouro_speculator_version')}`;
  drawCharts();
}

// ---------------------------------------------------------------- SVG charts
const SVGNS = 'http://www.w3.org/2000/svg';
const svg = (tag, attrs = {}, text) => {
  const e = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
};
// Draws series [{points:[{t,v}], label}] on an svg, with vertical markers [{t, kind, label}].
function drawChart(node, lines, markers = [], unit = '') {
  const W = Math.max(300, Math.round(node.clientWidth || 600)), H = 220, L = 44, R = 10, T = 12, B = 24;
  node.setAttribute('viewBox', `0 0 ${W} ${H}`);
  node.textContent = '';
  const all = lines.flatMap((l) => l.points);
  const now = Date.now() / 1000;
  // The window: since the page opened (at least a minute), and the last 15 minutes of markers.
  const recent = markers.filter((m) => m.t >= now - 900).map((m) => m.t);
  const t0 = Math.min(now - 60, ...all.map((p) => p.t), ...recent), t1 = Math.max(now, ...all.map((p) => p.t));
  let vmax = Math.max(1, ...all.map((p) => p.v));
  vmax = niceMax(vmax);
  const x = (t) => L + ((t - t0) / (t1 - t0 || 1)) * (W - L - R);
  const y = (v) => H - B - (v / vmax) * (H - T - B);
  for (let i = 0; i <= 4; i++) {
    const v = (vmax * i) / 4;
    node.append(svg('line', { class: 'grid', x1: L, x2: W - R, y1: y(v), y2: y(v) }));
    node.append(svg('text', { x: L - 4, y: y(v) + 4, 'text-anchor': 'end' }, fmtTick(v)));
  }
  node.append(svg('line', { class: 'axis', x1: L, x2: L, y1: T, y2: H - B }));
  node.append(svg('line', { class: 'axis', x1: L, x2: W - R, y1: H - B, y2: H - B }));
  node.append(svg('text', { x: L, y: H - 6 }, new Date(t0 * 1000).toLocaleTimeString()));
  node.append(svg('text', { x: W - R, y: H - 6, 'text-anchor': 'end' }, new Date(t1 * 1000).toLocaleTimeString()));
  markers.forEach((m, i) => {
    if (m.t < t0 || m.t > t1) return;
    const g = svg('g', { class: `marker mk-${m.kind}` });
    g.append(svg('line', { class: `mk mk-${m.kind}`, x1: x(m.t), x2: x(m.t), y1: T, y2: H - B }));
    g.append(svg('text', { x: x(m.t) + 3, y: T + 10 + (i % 3) * 12 }, m.label));
    g.append(svg('title', {}, m.title || m.label));
    node.append(g);
  });
  lines.forEach((l, i) => {
    if (l.points.length > 1) {
      node.append(svg('polyline', { class: `line s${i}`, points: l.points.map((p) => `${x(p.t).toFixed(1)},${y(p.v).toFixed(1)}`).join(' ') }));
    }
    for (const p of l.points) {
      const c = svg('circle', { class: `pt s${i}`, cx: x(p.t).toFixed(1), cy: y(p.v).toFixed(1), r: 2.5 });
      c.append(svg('title', {}, `${l.label}: ${fmtTick(p.v)}${unit} at ${new Date(p.t * 1000).toLocaleTimeString()}`));
      node.append(c);
    }
  });
  if (lines.length > 1 || lines[0].label) {
    lines.forEach((l, i) => node.append(svg('text', { x: L + 8 + i * 100, y: T + 12, class: `legend s${i}`, fill: i ? '#d9822b' : '#2f6fec' }, l.label)));
  }
  if (!all.length) node.append(svg('text', { x: W / 2, y: H / 2, 'text-anchor': 'middle' }, 'no data yet'));
}
function niceMax(v) {
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}
const fmtTick = (v) => (Math.abs(v) >= 100 ? v.toFixed(0) : Math.abs(v) >= 10 ? v.toFixed(1) : v.toFixed(2));

function markers() {
  const out = [];
  for (const h of specHistory) {
    if (h.event === 'rolled_back') out.push({ t: h.at_unix, kind: 'rollback', label: `rollback v${h.version}`, title: h.note });
    else if (h.event === 'accepted' || h.event === 'manual_swap') out.push({ t: h.at_unix, kind: 'swap', label: `v${h.version}`, title: `${h.event}: ${h.note}` });
  }
  return out;
}
function drawCharts() {
  if (currentView === 'learning') {
    drawChart($('#chart-acceptance'), [{ points: series.acceptance, label: '' }], markers());
    drawChart($('#chart-tps'), [{ points: series.tps, label: '' }], markers(), ' tok/s');
  }
  if (currentView === 'load') {
    drawChart($('#chart-kv'), [{ points: series.kv, label: '' }], [], ' %');
    drawChart($('#chart-load'), [{ points: series.running, label: 'running' }, { points: series.waiting, label: 'waiting' }]);
  }
}

// ---------------------------------------------------------------- learning (admin)
async function pollLearning() {
  if (!getKey('admin')) {
    $('#trainer-status').textContent = 'Enter the admin key above to see the trainer and speculator versions.';
    $('#spec-versions').textContent = '—';
    return;
  }
  try {
    const [tr, sp] = await Promise.all([api('GET', '/admin/trainer'), api('GET', '/admin/speculator')]);
    specHistory = sp.history || [];
    renderTrainer(tr);
    renderVersions(sp);
    drawCharts();
  } catch (e) {
    $('#trainer-status').textContent = refusal(e);
  }
}
function renderTrainer(t) {
  const box = $('#trainer-status');
  box.textContent = '';
  box.classList.remove('muted');
  const kv = [['state', t.alive ? (t.paused ? 'paused' : 'training') : 'stopped'], ['serving', `v${t.serving_version}`], ['steps', t.steps],
    ['bad steps', t.bad_steps], ['last loss', fmt(t.last_loss, 4)], ['traces', `${t.traces_received} (${t.traces_dropped} dropped)`],
    ['replay', `${(t.replay_bytes / 1048576).toFixed(1)} MiB`], ['swaps', t.swaps && Object.keys(t.swaps).length ? Object.entries(t.swaps).map(([k, v]) => `${k} ${v}`).join(', ') : '—']];
  if (t.last_error) kv.push(['last error', t.last_error]);
  for (const [k, v] of kv) box.append(el('span', { 'data-k': k }, `${k}: `, el('b', {}, v)));
}
function renderVersions(sp) {
  const rows = sp.history.slice().reverse();
  const table = el('table', {}, el('tr', {}, ...['version', 'event', 'when', 'step', 'simulated', 'serving sim.', 'live before', 'live after', 'note', ''].map((h) => el('th', {}, h))));
  for (const h of rows) {
    const tr = el('tr', { class: h.version === sp.serving_version && (h.event === 'accepted' || h.event === 'manual_swap' || h.event === 'initial') ? 'serving' : '' },
      el('td', {}, `v${h.version}`), el('td', {}, h.event), el('td', {}, new Date(h.at_unix * 1000).toLocaleTimeString()), el('td', {}, h.step),
      el('td', {}, fmt(h.simulated)), el('td', {}, fmt(h.simulated_serving)), el('td', {}, fmt(h.live_before)), el('td', {}, fmt(h.live_after)),
      el('td', {}, h.note), el('td', {}, el('button', { class: 'small secondary', onclick: () => { $('#swap-version').value = h.version; } }, 'select')));
    table.append(tr);
  }
  const box = $('#spec-versions');
  box.textContent = '';
  box.classList.remove('muted');
  box.append(el('div', {}, 'Serving ', el('b', {}, `v${sp.serving_version}`), sp.candidates.length ? ` · rejected candidates: ${sp.candidates.map((c) => `v${c}`).join(', ')}` : ''), table);
}
async function adminAction(label, method, path, body) {
  const m = $('#admin-msg');
  m.className = 'msg ok'; m.textContent = `${label}…`; m.dataset.busy = '1';
  try {
    const r = await api(method, path, body);
    const what = r && r.message ? r.message : r && 'paused' in r ? (r.paused ? 'trainer paused' : 'trainer running') : 'ok';
    showMsg('#admin-msg', true, `Done: ${label} — ${what}`);
  } catch (e) {
    showMsg('#admin-msg', false, `${label}: ${refusal(e)}`);
  }
  delete m.dataset.busy;
  pollLearning();
}
$('#btn-pause').addEventListener('click', () => adminAction('pause', 'POST', '/admin/trainer/pause'));
$('#btn-resume').addEventListener('click', () => adminAction('resume', 'POST', '/admin/trainer/resume'));
$('#btn-rollback').addEventListener('click', () => adminAction('rollback', 'POST', '/admin/speculator/rollback'));
$('#btn-snapshot').addEventListener('click', () => adminAction('snapshot', 'POST', '/admin/speculator/snapshot'));
$('#btn-swap').addEventListener('click', () => {
  const v = $('#swap-version').value;
  if (v === '') { showMsg('#admin-msg', false, 'swap: pick a version first'); return; }
  adminAction(`swap to v${v}`, 'POST', '/admin/speculator/swap', { version: Number(v), force: $('#swap-force').checked });
});

// ---------------------------------------------------------------- experiences
let selectedLib = null;
async function loadLibraries() {
  try {
    const r = await api('GET', '/v1/experiences');
    const list = $('#exp-list');
    list.textContent = '';
    const sel = $('#chat-exp');
    const keep = sel.value;
    sel.textContent = '';
    sel.append(el('option', { value: '' }, '(server default)'));
    for (const lib of r.data) {
      list.append(el('li', { class: lib.name === selectedLib ? 'selected' : '', 'data-name': lib.name, onclick: () => selectLibrary(lib.name) },
        el('b', {}, lib.name), ` v${lib.version} · ${Array.isArray(lib.items) ? lib.items.length : lib.items} items${lib.default ? ' · default' : ''}`));
      sel.append(el('option', { value: lib.name }, lib.name));
    }
    sel.value = keep;
    if (!r.data.length) list.append(el('li', { class: 'muted' }, 'No libraries yet: add an item or start a learn job.'));
    if (selectedLib) await selectLibrary(selectedLib);
  } catch (e) {
    showMsg('#exp-msg', false, `libraries: ${refusal(e)}`);
  }
}
async function selectLibrary(name) {
  selectedLib = name;
  for (const li of document.querySelectorAll('#exp-list li')) li.classList.toggle('selected', li.dataset.name === name);
  $('#learn-name').value ||= name;
  $('#exp-new-name').value ||= name;
  let lib;
  try { lib = await api('GET', `/v1/experiences/${encodeURIComponent(name)}`); } catch (e) { showMsg('#exp-msg', false, refusal(e)); return; }
  $('#exp-title').textContent = `${lib.name} — version ${lib.version}`;
  const box = $('#exp-detail');
  box.textContent = '';
  box.classList.remove('muted');
  if (!lib.items.length) box.append(el('div', { class: 'muted' }, 'No items in this version.'));
  for (const it of lib.items) box.append(itemRow(lib.name, it));
  if (lib.versions && lib.versions.length) {
    const versions = lib.versions.slice().sort((a, b) => b.version - a.version);
    // Where each version came from: the key (as a hash) that changed it by hand, the learn job, or the feedback batch.
    const origin = (v) => [v.actor && `by ${v.actor}`, v.job_id && `job ${v.job_id}`, v.feedback_batch && `batch ${v.feedback_batch}`].filter(Boolean).join(' · ') || '—';
    const table = el('table', { id: 'exp-versions' }, el('tr', {}, ...['version', 'when', 'source', 'origin', 'items', 'note'].map((h) => el('th', {}, h))));
    for (const v of versions) {
      table.append(el('tr', { 'data-version': v.version, class: v.version === lib.version ? 'serving' : '' },
        el('td', {}, `v${v.version}`), el('td', {}, new Date(v.created_at * 1000).toLocaleString()), el('td', { class: 'source' }, v.source),
        el('td', { class: 'origin' }, origin(v)), el('td', {}, v.items), el('td', {}, v.note)));
    }
    const sel = el('select', { id: 'exp-rollback-version' }, ...versions.map((v) => el('option', { value: v.version }, `v${v.version} · ${v.source} · ${v.items} items${v.note ? ` · ${v.note}` : ''}`)));
    const previous = versions.find((v) => v.version < lib.version);
    if (previous) sel.value = String(previous.version);
    box.append(el('h3', {}, 'Versions'), table, el('div', { class: 'actions' }, sel, el('button', { id: 'exp-rollback', class: 'secondary', onclick: () => rollbackLibrary(lib.name, Number(sel.value)) }, 'Roll back to this version')));
  }
}
function itemRow(lib, it) {
  const row = el('div', { class: 'item', 'data-id': it.id });
  const text = el('div', { class: 'item-text' }, el('div', { class: 'text' }, it.text), el('div', { class: 'item-meta' }, `#${it.id} · v${it.created_version}→v${it.updated_version} · used ${it.uses}, won ${it.wins}`));
  const edit = el('button', { class: 'small secondary edit' }, 'Edit');
  const del = el('button', { class: 'small danger delete' }, 'Delete');
  edit.addEventListener('click', () => {
    const ta = el('textarea', { rows: 2, class: 'edit-text' });
    ta.value = it.text;
    const save = el('button', { class: 'small save' }, 'Save');
    const cancel = el('button', { class: 'small secondary' }, 'Cancel');
    row.textContent = '';
    row.append(ta, save, cancel);
    cancel.addEventListener('click', () => selectLibrary(lib));
    save.addEventListener('click', async () => {
      try {
        const r = await api('PATCH', `/v1/experiences/${encodeURIComponent(lib)}/items/${it.id}`, { text: ta.value.trim() });
        showMsg('#exp-msg', true, `Saved item #${it.id}: ${lib} is now version ${r.version}`);
        loadLibraries();
      } catch (e) { showMsg('#exp-msg', false, `edit: ${refusal(e)}`); }
    });
  });
  del.addEventListener('click', async () => {
    if (!confirm(`Delete item #${it.id}?`)) return;
    try {
      const r = await api('DELETE', `/v1/experiences/${encodeURIComponent(lib)}/items/${it.id}`);
      showMsg('#exp-msg', true, `Deleted item #${it.id}: ${lib} is now version ${r.version}`);
      loadLibraries();
    } catch (e) { showMsg('#exp-msg', false, `delete: ${refusal(e)}`); }
  });
  row.append(text, edit, del);
  return row;
}
async function rollbackLibrary(name, version) {
  try {
    const r = await api('POST', `/v1/experiences/${encodeURIComponent(name)}/rollback`, { version });
    showMsg('#exp-msg', true, `Rolled ${name} back to the items of v${version}: now version ${r.version}`);
    loadLibraries();
  } catch (e) { showMsg('#exp-msg', false, `rollback: ${refusal(e)}`); }
}
$('#exp-refresh').addEventListener('click', loadLibraries);
$('#exp-add').addEventListener('click', async () => {
  const name = $('#exp-new-name').value.trim(), text = $('#exp-new-text').value.trim();
  if (!name || !text) { showMsg('#exp-msg', false, 'add: give a library name and the experience text'); return; }
  try {
    const r = await api('POST', `/v1/experiences/${encodeURIComponent(name)}/items`, { text });
    $('#exp-new-text').value = '';
    selectedLib = name;
    showMsg('#exp-msg', true, `Added to ${name}: now version ${r.version}`);
    loadLibraries();
  } catch (e) { showMsg('#exp-msg', false, `add: ${refusal(e)}`); }
});

let jobTimer = null, jobId = null;
$('#learn-start').addEventListener('click', async () => {
  const name = $('#learn-name').value.trim();
  let dataset;
  try {
    dataset = $('#learn-jsonl').value.split('\n').map((l) => l.trim()).filter(Boolean).map((l, i) => {
      try { const o = JSON.parse(l); return { prompt: String(o.prompt), answer: String(o.answer) }; } catch (_) { throw new Error(`line ${i + 1} is not JSON`); }
    });
  } catch (e) { showMsg('#exp-msg', false, `learn: ${e.message}`); return; }
  if (!name || !dataset.length) { showMsg('#exp-msg', false, 'learn: give a library name and at least one JSONL line'); return; }
  try {
    const job = await api('POST', `/v1/experiences/${encodeURIComponent(name)}/learn`, {
      dataset, verifier: $('#learn-verifier').value, group_size: Number($('#learn-group').value), epochs: Number($('#learn-epochs').value), max_tokens: Number($('#learn-max').value),
    });
    showMsg('#exp-msg', true, `Started learn job ${job.id}`);
    watchJob(job.id);
  } catch (e) { showMsg('#exp-msg', false, `learn: ${refusal(e)}`); }
});
$('#learn-cancel').addEventListener('click', async () => {
  if (!jobId) return;
  try { await api('DELETE', `/v1/experiences/jobs/${jobId}`); } catch (e) { showMsg('#exp-msg', false, `cancel: ${refusal(e)}`); }
});
function watchJob(id) {
  jobId = id;
  clearInterval(jobTimer);
  $('#learn-cancel').disabled = false;
  const tick = async () => {
    let j;
    try { j = await api('GET', `/v1/experiences/jobs/${id}`); } catch (e) { $('#learn-job').textContent = refusal(e); return; }
    renderJob(j);
    if (['done', 'failed', 'cancelled'].includes(j.state)) { clearInterval(jobTimer); $('#learn-cancel').disabled = true; loadLibraries(); }
  };
  tick();
  jobTimer = setInterval(tick, 2000);
}
function renderJob(j) {
  const box = $('#learn-job');
  box.textContent = '';
  box.classList.remove('muted');
  box.dataset.state = j.state;
  box.append(
    el('div', {}, `Job ${j.id} on `, el('b', {}, j.library), ` · `, el('b', { class: 'job-state' }, j.state),
      ` · epoch ${j.epoch ?? '—'}/${j.epochs ?? '—'} · step ${j.step ?? '—'}/${j.total_steps ?? '—'}`),
    el('div', { class: 'progress' }, el('div', { style: `width:${(100 * (j.progress || 0)).toFixed(1)}%` })),
  );
  if (j.epoch_reports && j.epoch_reports.length) {
    box.append(el('div', {}, 'Epochs: ', j.epoch_reports.map((r) => `#${r.epoch} train ${fmt(r.train_reward)} held-out ${fmt(r.heldout_reward)} → v${r.version}`).join(' · ')));
  }
  if (j.gates && j.gates.length) {
    box.append(el('div', {}, 'Gates: ', j.gates.map((g) => `${g.accepted ? 'kept' : 'rejected'} (${fmt(g.candidate_reward)} vs ${fmt(g.current_reward)})`).join(' · ')));
  }
  if (j.error) box.append(el('div', { class: 'msg error' }, j.error));
}

// ---------------------------------------------------------------- start
showKeys();
const startView = location.hash.slice(1);
showView(['chat', 'learning', 'experiences', 'load'].includes(startView) ? startView : 'chat');
loadLibraries();
pollMetrics();
setInterval(pollMetrics, 2000);
setInterval(() => { if (currentView === 'learning') pollLearning(); }, 4000);
