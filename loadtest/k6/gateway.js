// k6 scenarios against the gateway, one per run (SCENARIO), driven by the k6-load orchestrator
// (gateway/examples/k6-load.rs), which starts the upstream and the gateway, writes DATA (the
// hosts, tokens and signed routes to use) and judges the summary.
//
// Env: SCENARIO, BASE (http://host:port of the gateway), DATA (JSON file), RATE (iterations per
// second), DURATION (e.g. 10s). Every scenario uses an open-model executor; a dropped iteration,
// a failed request or a failed check fails the run.
import http from 'k6/http';
import ws from 'k6/ws';
import { check } from 'k6';

const data = JSON.parse(open(__ENV.DATA));
const BASE = __ENV.BASE;
const RATE = parseInt(__ENV.RATE || '200', 10);
const DURATION = __ENV.DURATION || '10s';
const SCENARIO = __ENV.SCENARIO;

function arrival(exec, rate, extra) {
  return Object.assign({
    executor: 'constant-arrival-rate',
    exec,
    rate,
    timeUnit: '1s',
    duration: DURATION,
    preAllocatedVUs: Math.max(10, Math.ceil(rate / 10)),
    maxVUs: Math.max(50, rate),
  }, extra || {});
}

const strict = {
  http_req_failed: ['rate==0'],
  checks: ['rate==1'],
  dropped_iterations: ['count==0'],
};

const scenarios = {
  header: { scenarios: { header: arrival('header', RATE) }, thresholds: Object.assign({ 'http_req_duration': ['p(99)<250'] }, strict) },
  host: { scenarios: { host: arrival('host', RATE) }, thresholds: Object.assign({ 'http_req_duration': ['p(99)<250'] }, strict) },
  signed: { scenarios: { signed: arrival('signed', RATE) }, thresholds: Object.assign({ 'http_req_duration': ['p(99)<250'] }, strict) },
  secure: { scenarios: { secure: arrival('secure', RATE) }, thresholds: Object.assign({ 'http_req_duration': ['p(99)<250'] }, strict) },
  websocket: {
    scenarios: { websocket: arrival('websocket', Math.max(1, Math.floor(RATE / 10))) },
    thresholds: { checks: ['rate==1'], dropped_iterations: ['count==0'], ws_connecting: ['p(99)<500'] },
  },
  sse: {
    // An SSE iteration lasts ~0.6 s: allocate the VUs up front, so none is started mid-run.
    scenarios: { sse: arrival('sse', Math.max(1, Math.floor(RATE / 10)), { preAllocatedVUs: Math.max(10, RATE), maxVUs: Math.max(50, 2 * RATE) }) },
    thresholds: strict,
  },
  churn: { scenarios: { churn: arrival('host', RATE) }, thresholds: Object.assign({ 'http_req_duration': ['p(99)<250'] }, strict) },
  // The long run (`make soak`): every kind of plain request, mixed.
  // Over ten minutes a pause of ~100 ms (k6's own garbage collector, the shared 2 cores) found
  // the 100 pre-allocated VUs busy and dropped iterations; VUs started mid-run come too late.
  soak: { scenarios: { soak: arrival('mixed', RATE, { preAllocatedVUs: Math.max(10, Math.ceil(RATE / 4)) }) }, thresholds: Object.assign({ 'http_req_duration': ['p(99)<250'] }, strict) },
  flood: {
    scenarios: {
      attack: arrival('forged', RATE),
      good: arrival('secure', Math.max(1, Math.floor(RATE / 4))),
    },
    thresholds: {
      'http_req_failed{scenario:good}': ['rate==0'],
      'checks{scenario:good}': ['rate==1'],
      'checks{scenario:attack}': ['rate==1'],
      dropped_iterations: ['count==0'],
    },
  },
};

if (!scenarios[SCENARIO]) {
  throw new Error(`unknown SCENARIO ${SCENARIO}; one of ${Object.keys(scenarios).join(', ')}`);
}

export const options = Object.assign({
  discardResponseBodies: SCENARIO !== 'sse',
  summaryTrendStats: ['avg', 'p(50)', 'p(95)', 'p(99)', 'max'],
  noConnectionReuse: false,
}, scenarios[SCENARIO]);

function pick(list) {
  return list[Math.floor(Math.random() * list.length)];
}

function ok(res) {
  return check(res, { 'status 200': (r) => r.status === 200 });
}

export function header() {
  ok(http.get(`${BASE}/probe`, { headers: { 'OpenSandbox-Ingress-To': pick(data.open) } }));
}

export function host() {
  ok(http.get(`${BASE}/probe`, { headers: { Host: `${pick(data.open)}.sandbox.test` } }));
}

export function signed() {
  ok(http.get(`${BASE}/probe`, { headers: { Host: `${pick(data.signed)}.sandbox.test` } }));
}

export function secure() {
  const s = pick(data.secure);
  ok(http.get(`${BASE}/probe`, { headers: { Host: `${s.route}.sandbox.test`, 'OpenSandbox-Secure-Access': s.token } }));
}

export function mixed() {
  const r = Math.random();
  if (r < 0.4) host();
  else if (r < 0.7) header();
  else if (r < 0.85) signed();
  else secure();
}

// Bad signatures: refused (401), then held off (429); never proxied, never a 5xx.
export function forged() {
  const res = http.get(`${BASE}/probe`, {
    headers: { Host: `${pick(data.forged)}.sandbox.test` },
    responseCallback: http.expectedStatuses(401, 429),
  });
  check(res, { 'refused': (r) => r.status === 401 || r.status === 429 });
}

export function sse() {
  const res = http.get(`${BASE}/sse`, { headers: { 'OpenSandbox-Ingress-To': pick(data.open) }, timeout: '10s' });
  check(res, {
    'status 200': (r) => r.status === 200,
    'three events': (r) => typeof r.body === 'string' && r.body.includes('event-2'),
  });
}

export function websocket() {
  let echoed = false;
  const res = ws.connect(`${BASE.replace('http', 'ws')}/ws`, { headers: { 'OpenSandbox-Ingress-To': pick(data.open) } }, (socket) => {
    let seen = 0;
    socket.on('open', () => socket.send('ping-from-k6'));
    socket.on('message', (msg) => {
      seen += 1;
      // The first message is the upstream's view of the handshake; the second the echo.
      if (seen > 1) {
        echoed = msg === 'ping-from-k6';
        socket.close();
      }
    });
    socket.setTimeout(() => socket.close(), 5000);
  });
  check(res, { 'upgraded': (r) => r && r.status === 101 });
  check(echoed, { 'echoed': (e) => e === true });
}
