// trace.js: #/trace/CORRELATION: every event of a correlation, as the
// causation tree: a command, the events it produced, the commands issued
// because of them (a reactor's command id holds the event's id), and so on.
import { api } from './api.js';
import { el, errorText, streamLink, when } from './util.js';

const MAX_EVENTS = 10000;

export function buildTree(events) {
  // Commands, by the id their events carry as causation.
  const commands = new Map();
  for (const e of events) {
    const m = e.metadata || {};
    const id = m.command_id || m.causation_id || '(no command)';
    if (!commands.has(id)) commands.set(id, { id, events: [], children: [] });
    commands.get(id).events.push(e);
  }
  const byEvent = new Map(events.map((e) => [e.id, e]));
  const childrenOf = new Map(); // event id -> commands
  const roots = [];
  for (const c of commands.values()) {
    let parent = null;
    const cause = c.events[0].metadata && c.events[0].metadata.caused_by;
    if (cause && byEvent.has(cause)) parent = cause;
    else for (const id of byEvent.keys()) if (id !== c.id && c.id.includes(id)) { parent = id; break; }
    if (parent) {
      if (!childrenOf.has(parent)) childrenOf.set(parent, []);
      childrenOf.get(parent).push(c);
    } else roots.push(c);
  }
  return { roots, childrenOf };
}

function commandNode(c, childrenOf) {
  return el('li',
    el('span.cmd', 'command '), el('code', c.id),
    c.events[0].metadata && c.events[0].metadata.reactor ? el('span.muted', ` issued by reactor ${c.events[0].metadata.reactor}`) : null,
    el('ul', c.events.map((e) => el('li', { 'data-position': e.position },
      el('strong', e.type), ' in ', streamLink(e.stream, e.version), ' ', el('span.muted', `#${e.position} `), when(e.recorded_at),
      childrenOf.has(e.id) ? el('ul', childrenOf.get(e.id).map((k) => commandNode(k, childrenOf))) : null))));
}

export function render(main, hash) {
  const corr = decodeURIComponent(hash.slice('#/trace'.length).replace(/^\//, ''));
  const input = el('input', { id: 't-corr', name: 'correlation', value: corr, required: true });
  const form = el('form.bar', el('label', { for: 't-corr' }, 'Correlation id', input), el('button', { type: 'submit' }, 'Trace'));
  form.addEventListener('submit', (e) => { e.preventDefault(); location.hash = '#/trace/' + encodeURIComponent(input.value); });
  const out = el('div', { 'aria-live': 'polite' });
  main.append(el('h1', 'Trace'), el('p.muted', 'Open a trace from any event ("trace" link), or enter a correlation id.'), form, out);
  if (!corr) return;
  (async () => {
    const events = [];
    let after = 0;
    while (events.length < MAX_EVENTS) {
      const r = await api(`/events?correlation_id=${encodeURIComponent(corr)}&after=${after}&limit=1000`);
      if (!r.ok) { out.replaceChildren(el('p.error', errorText(r))); return; }
      events.push(...r.data.events);
      if (r.data.events.length < 1000) break;
      after = r.data.next;
    }
    if (!events.length) { out.replaceChildren(el('p', 'No event has this correlation id.')); return; }
    const { roots, childrenOf } = buildTree(events);
    out.replaceChildren(el('p.muted', `${events.length} events, ${roots.length} root command(s)`),
      el('ul.tree', roots.map((c) => commandNode(c, childrenOf))));
  })();
}
