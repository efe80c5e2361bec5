// projections.js: #/projections: status and lag, a fault with its message,
// position and module line, retry / skip / rebuild (confirmed first), and a
// query with arguments. Reactors, where the daemon has them, below.
import { api, every } from './api.js';
import { el, errorText, pretty } from './util.js';

function lineOf(message) {
  const m = /([\w./-]+\.lua):(\d+)/.exec(message || '');
  return m ? `${m[1]} line ${m[2]}` : null;
}

function controls(kind, s, after) {
  const act = async (action) => {
    const warn = action === 'rebuild'
      ? `Rebuild ${s.name} from the start? It keeps answering from the current copy until the new one catches up.`
      : action === 'skip' ? `Skip the event at position ${s.last_error && s.last_error.position} for ${s.name}? It will never be applied.`
        : `Retry ${s.name} from the event that failed?`;
    if (!window.confirm(warn)) return;
    const r = await api(`/${kind}/${encodeURIComponent(s.name)}/${action}`, { method: 'POST', json: {} });
    after(r.ok ? `${action}: done` : `${action}: ${errorText(r)}`, !r.ok);
  };
  const b = (action, cls) => el('button' + (cls ? '.' + cls : ''), {
    type: 'button', 'data-action': action, 'data-name': s.name, 'aria-label': `${action} ${s.name}`,
    onclick: () => act(action) }, action);
  return el('div.bar', s.state === 'faulted' ? [b('retry'), b('skip', 'danger')] : null, kind === 'projections' ? b('rebuild', 'secondary') : null);
}

function row(kind, s, after) {
  const fault = s.last_error;
  return el('tr', { 'data-name': s.name },
    el('td', el('strong', s.name), el('div.muted', `v${s.version ?? ''}`)),
    el('td', el('span', { class: 'state-' + s.state }, s.state)),
    el('td', `${s.position ?? '-'} / ${s.head ?? '-'}`, el('div.muted', `${s.lag_events ?? 0} behind`)),
    el('td.wide', (s.from || []).join(', ')),
    el('td', fault ? el('div.error', el('div', fault.message), el('div', `at position ${fault.position}`),
      lineOf(fault.message) ? el('div', lineOf(fault.message)) : null) : s.load_error ? el('div.error', s.load_error) : el('span.muted', 'none')),
    el('td', controls(kind, s, after)));
}

// Puts `fresh` rows in `parent`, keeping each row that looks the same: a
// refresh every 2 s must not replace a button under the user's pointer.
function sync(parent, fresh) {
  const old = [...parent.children];
  fresh.forEach((row, i) => {
    if (!old[i]) parent.append(row);
    else if (old[i].outerHTML !== row.outerHTML) old[i].replaceWith(row);
  });
  old.slice(fresh.length).forEach((n) => n.remove());
}

export function render(main) {
  const note = el('p', { 'aria-live': 'polite' });
  const body = el('tbody', { id: 'p-rows' });
  const reactors = el('section', { hidden: true });
  const reactorRows = el('tbody');
  const publisher = el('section', { hidden: true, id: 'p-publisher' });
  const qProj = el('select', { id: 'q-projection', name: 'projection' });
  const qName = el('select', { id: 'q-query', name: 'query' });
  const qArgs = el('input', { id: 'q-args', name: 'args', placeholder: 'id=a-1&limit=10' });
  const qOut = el('pre', { id: 'q-result', 'aria-live': 'polite' });
  const qForm = el('form.bar', el('label', { for: 'q-projection' }, 'Projection', qProj), el('label', { for: 'q-query' }, 'Query', qName),
    el('label', { for: 'q-args' }, 'Arguments (name=value&...)', qArgs), el('button', { type: 'submit' }, 'Run'));
  const head = () => el('thead', el('tr', el('th', 'Name'), el('th', 'State'), el('th', 'Position / head'), el('th.wide', 'From'), el('th', 'Fault'), el('th', 'Actions')));
  main.append(el('h1', 'Projections'), note, el('div.table-wrap', el('table', head(), body)),
    el('h2', 'Run a query'), qForm, qOut, reactors, publisher);
  let statuses = [];
  const fillQueries = () => {
    const s = statuses.find((x) => x.name === qProj.value);
    const keep = qName.value;
    qName.replaceChildren(...(s ? s.queries || [] : []).map((q) => el('option', { value: q, selected: q === keep }, q)));
  };
  qProj.addEventListener('change', fillQueries);
  qForm.addEventListener('submit', async (e) => {
    e.preventDefault();
    const r = await api(`/projections/${encodeURIComponent(qProj.value)}/${encodeURIComponent(qName.value)}?${qArgs.value.replace(/^\?/, '')}`);
    qOut.textContent = r.ok ? pretty(r.data) : errorText(r);
    qOut.className = r.ok ? '' : 'error';
  });
  let hasReactors = true;
  const after = (msg, bad) => { note.textContent = msg; note.className = bad ? 'error' : 'ok'; refresh(); };
  async function refresh() {
    const r = await api('/projections');
    if (!r.ok) { note.textContent = errorText(r); return; }
    statuses = r.data;
    sync(body, statuses.map((s) => row('projections', s, after)));
    const keep = qProj.value;
    qProj.replaceChildren(...statuses.map((s) => el('option', { value: s.name, selected: s.name === keep }, s.name)));
    fillQueries();
    // The NATS publisher, where the daemon has one: its status is part of /health.
    const h = await api('/health');
    const pub = h.data && (h.data.nats || h.data.publisher);
    publisher.hidden = !pub;
    if (pub) {
      publisher.replaceChildren(el('h2', 'NATS publisher'), el('p',
        el('span', { class: 'state-' + (pub.state === 'live' ? 'live' : 'faulted') }, pub.state),
        ` position ${pub.position ?? '-'} / ${pub.head ?? '-'}, ${pub.lag_events ?? 0} behind`,
        pub.last_error ? el('div.error', typeof pub.last_error === 'string' ? pub.last_error : JSON.stringify(pub.last_error)) : null));
    }
    if (hasReactors) {
      const rr = await api('/reactors');
      if (rr.status === 404) { hasReactors = false; return; }
      const list = Array.isArray(rr.data) ? rr.data : (rr.data && rr.data.reactors) || [];
      if (reactors.hidden) {
        reactors.replaceChildren(el('h2', 'Reactors'), el('div.table-wrap', el('table', head(), reactorRows)));
        reactors.hidden = false;
      }
      sync(reactorRows, list.map((s) => row('reactors', s, after)));
    }
  }
  return every(2000, refresh);
}
