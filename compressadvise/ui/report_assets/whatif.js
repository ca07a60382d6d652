/* compressadvise report, What if: choose a setting per layer (one by one, or for many layers at
   once), watch the predicted size, latency and fidelity, and download the plan file. Every number
   comes from #whatif-data, sized in Python by the code that sizes the plan; this script only adds
   them up, and writes the plan exactly as compressadvise.plan.whatif.plan_for_choices does (keep
   the two in step: tests/test_report_whatif.py compares them). No network. */
(function () {
  'use strict';
  var W, wl, choice, opt0, keyIndex;

  function $(id) { return document.getElementById(id); }
  function clone(o) { return JSON.parse(JSON.stringify(o)); }
  function last(b) { return Array.isArray(b) ? b[b.length - 1] : b; }
  function stages(b) { return Array.isArray(b) ? b : [b]; }
  function esc(s) {
    return String(s).replace(/[&<>"']/g, function (c) {
      return {'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;'}[c];
    });
  }

  // The CLI's units (ui/render.py): B/KB/MB/GB in steps of 1000, and µs/ms/s with 3 digits.
  function humanBytes(n) {
    var units = [['B', 1], ['KB', 1e3], ['MB', 1e6]];
    for (var i = 0; i < units.length; i++) {
      if (Math.abs(n) < units[i][1] * 1000) return i === 0 ? n.toFixed(0) + ' B' : (n / units[i][1]).toFixed(2) + ' ' + units[i][0];
    }
    return (n / 1e9).toFixed(2) + ' GB';
  }
  function sig3(x) { return String(parseFloat(x.toPrecision(3))); }
  function humanMs(ms) {
    if (Math.abs(ms) < 0.9995) return sig3(ms * 1000) + ' µs';
    return Math.abs(ms) < 999.5 ? sig3(ms) + ' ms' : sig3(ms / 1000) + ' s';
  }
  function signed(text, v) { return v > 0 ? '+' + text : v < 0 ? '−' + text.replace(/^-/, '') : 'same'; }

  function optionOf(i, j) { return W.opts[W.sets[wl[i].s][j === undefined ? choice[i] : j]]; }

  // ---------------------------------------------------------------- totals
  function totals() {
    var bytes = W.before, ms = W.latency ? W.latency.fixed : null, noise = 0, unmeasured = 0, changed = 0;
    wl.forEach(function (L, i) {
      var j = choice[i], keep = W.sets[L.s][j] === 0;
      bytes += last(L.b[j]) - L.f;
      if (ms !== null && L.t) ms += L.t[j];
      var e = L.e ? L.e[j] : (keep ? 0 : null);
      if (e === null || e === undefined) unmeasured++; else noise += e;
      if (j !== L.c) changed++;
    });
    return {bytes: bytes, ms: ms, noise: noise, unmeasured: unmeasured, changed: changed};
  }

  function showTotals() {
    var t = totals(), size = $('wi-size'), lat = $('wi-latency'), fid = $('wi-fidelity');
    size.setAttribute('data-bytes', String(t.bytes));
    var ratio = t.bytes ? W.before / t.bytes : 0;
    size.textContent = humanBytes(t.bytes) + ' (' + (Math.abs(ratio - 1) < 1e-9 ? 'same as fp16' : ratio.toFixed(2) +
      'x smaller than fp16') + (W.plan_bytes !== null ? '; the plan: ' + humanBytes(W.plan_bytes) : '') + ')';
    if (t.ms === null) {
      lat.setAttribute('data-ms', '');
      lat.textContent = 'not estimated: no roofline estimate for this model and target';
    } else {
      lat.setAttribute('data-ms', String(t.ms));
      lat.textContent = humanMs(t.ms) + ' (' + W.latency.basis + ', sum over layers)';
    }
    fid.setAttribute('data-psnr', '');
    if (W.fidelity.peak === undefined) {
      fid.textContent = W.fidelity.note;
    } else if (t.unmeasured) {
      fid.textContent = 'not predicted: ' + t.unmeasured + ' layer(s) at a setting without a sensitivity measurement';
    } else if (t.noise <= 0) {
      fid.setAttribute('data-psnr', 'Infinity');
      fid.textContent = 'identical to the original (nothing compressed)';
    } else {
      var psnr = 10 * Math.log10(W.fidelity.peak * W.fidelity.peak / t.noise);
      fid.setAttribute('data-psnr', String(psnr));
      fid.textContent = W.fidelity.label + ': ' + psnr.toFixed(2) + ' dB (' + W.fidelity.basis + ')';
    }
    $('wi-changed').textContent = t.changed + ' of ' + wl.length + ' layer(s) differ from the plan';
  }

  // ---------------------------------------------------------------- the table
  function rowCells(i) {
    var L = wl[i], j = choice[i], bytes = last(L.b[j]), delta = bytes - last(L.b[L.c]);
    return [humanBytes(bytes), delta ? signed(humanBytes(Math.abs(delta)), delta) : '—',
            L.t ? humanMs(L.t[j]) : '—'];
  }

  function rowHtml(i) {
    var L = wl[i], set = W.sets[L.s];
    var options = set.map(function (o, j) {
      return '<option value="' + esc(W.opts[o].k) + '"' + (j === choice[i] ? ' selected' : '') + '>' +
        esc(W.opts[o].l) + (j === L.c ? ' (plan)' : '') + '</option>';
    }).join('');
    var why = L.k ? ' title="' + esc(L.k[1]) + '"' : '';
    var cells = rowCells(i);
    return '<tr data-i="' + i + '"><td class=num>' + (i + 1) + '</td><td class=name>' + esc(L.n) + '</td><td>' +
      esc(L.y) + '</td><td><select data-layer="' + esc(L.n) + '" aria-label="setting of ' + esc(L.n) + '"' +
      (set.length < 2 ? ' disabled' : '') + why +
      '>' + options + '</select>' + (L.k ? ' <small>' + esc(L.k[0]) + '</small>' : '') + '</td><td class=num>' +
      cells[0] + '</td><td class=num>' + cells[1] + '</td><td class=num>' + cells[2] + '</td></tr>';
  }

  function refreshRow(i) {
    var tr = $('whatif-table').tBodies[0].rows[i], cells = rowCells(i);
    tr.cells[3].firstChild.value = optionOf(i).k;
    tr.classList.toggle('changed', choice[i] !== wl[i].c);
    for (var c = 0; c < 3; c++) tr.cells[4 + c].textContent = cells[c];
  }

  function refreshAll() { wl.forEach(function (_, i) { refreshRow(i); }); showTotals(); }

  // ---------------------------------------------------------------- selecting and setting in bulk
  function selected() {
    var t = $('wi-type').value, q = $('wi-name').value.trim().toLowerCase(), pre = $('wi-prefix').value.trim();
    var out = [];
    wl.forEach(function (L, i) {
      if ((!t || L.y === t) && (!q || L.n.toLowerCase().indexOf(q) >= 0) && (!pre || L.n.indexOf(pre) === 0)) out.push(i);
    });
    return out;
  }

  function showSelection() {
    var sel = selected(), only = $('wi-only').checked, mark = {};
    sel.forEach(function (i) { mark[i] = true; });
    $('wi-selected').textContent = sel.length + ' of ' + wl.length + ' selected';
    Array.prototype.forEach.call($('whatif-table').tBodies[0].rows, function (tr, i) {
      tr.classList.toggle('hidden', only && !mark[i]);
    });
  }

  function setSelected() {
    var key = $('wi-option').value, set = 0, left = 0;
    selected().forEach(function (i) {
      var j = key === '@plan' ? wl[i].c : W.sets[wl[i].s].indexOf(keyIndex[key]);
      if (j < 0) { left++; return; }
      choice[i] = j;
      set++;
    });
    refreshAll();
    $('wi-status').textContent = 'set ' + set + ' layer(s)' +
      (left ? '; ' + left + ' left alone (the setting is not allowed there)' : '');
    return {set: set, left: left};
  }

  function fillControls() {
    var types = {}, prefixes = {}, used = {};
    wl.forEach(function (L, i) {
      types[L.y] = true;
      var parts = L.n.split('.');
      for (var d = 1; d < parts.length; d++) {
        var p = parts.slice(0, d).join('.') + '.';
        prefixes[p] = (prefixes[p] || 0) + 1;
      }
      W.sets[L.s].forEach(function (o) { used[o] = true; });
    });
    $('wi-type').insertAdjacentHTML('beforeend', Object.keys(types).sort().map(function (t) {
      return '<option value="' + esc(t) + '">' + esc(t) + '</option>';
    }).join(''));
    $('wi-blocks').innerHTML = Object.keys(prefixes).filter(function (p) { return prefixes[p] > 1; }).slice(0, 300)
      .map(function (p) { return '<option value="' + esc(p) + '">'; }).join('');
    $('wi-option').innerHTML = '<option value="@plan">the plan\'s choice</option>' +
      W.opts.filter(function (o, i) { return used[i]; }).map(function (o) {
        return '<option value="' + esc(o.k) + '">' + esc(o.l) + '</option>';
      }).join('');
  }

  // ---------------------------------------------------------------- the plan file
  // plan.whatif.plan_for_choices, step by step: stages sorted by slot (stable), one step per
  // technique in order of first use, its most common setting (the first of equals) as params.
  function buildSteps(T) {
    var members = [];
    wl.forEach(function (L, i) {
      optionOf(i).st.forEach(function (st, j) {
        members.push({i: i, j: j, name: L.n, tech: st[0], rank: st[1], params: st[2], key: st[3], n: members.length});
      });
    });
    members.sort(function (a, b) { return a.rank - b.rank || a.n - b.n; });
    var order = [], groups = Object.create(null);
    members.forEach(function (m) {
      if (!groups[m.tech]) { groups[m.tech] = []; order.push(m.tech); }
      groups[m.tech].push(m);
    });
    var after = W.before;
    return order.map(function (tech) {
      var g = groups[tech], counts = Object.create(null), firsts = [], common = null, best = 0;
      g.forEach(function (m) { if (!counts[m.key]) { counts[m.key] = 0; firsts.push(m); } counts[m.key]++; });
      firsts.forEach(function (m) { if (counts[m.key] > best) { best = counts[m.key]; common = m; } });
      var step = clone(T.step);
      step.technique = tech;
      step.slot = W.slots[tech];
      step.params = Object.assign(clone(common.params), {weight_threshold: 0});
      step.layers = g.map(function (m) { return m.name; });
      step.op_name_params = Object.create(null);
      g.forEach(function (m) {
        var b = stages(wl[m.i].b[choice[m.i]]);
        after += b[m.j] - (m.j ? b[m.j - 1] : wl[m.i].f);
        if (m.key !== common.key) step.op_name_params[m.name] = clone(m.params);
      });
      step.why = W.why;
      step.predicted_bytes_after = after;
      return step;
    });
  }

  function buildPlan() {
    var T = W.templates, plan = clone(T.plan), steps = buildSteps(T), changed = [], compressed = 0;
    wl.forEach(function (L, i) {
      if (W.sets[L.s][choice[i]] === 0) {
        if (steps.length) {
          steps[0].skipped.push(Object.assign(clone(T.skip), {layer: L.n, reason: L.k ? L.k[1] : W.keep[1],
                                                              code: L.k ? L.k[0] : W.keep[0]}));
        }
      } else {
        compressed++;
      }
      if (choice[i] !== L.c) changed.push(L.n);
    });
    var pos = {};
    wl.forEach(function (L, i) { pos[L.n] = i; });
    var after = W.before;
    plan.layers = W.layers.map(function (L) {
      var i = pos[L.n], o = i === undefined ? opt0 : optionOf(i), bytes = i === undefined ? L.f : last(L.b[choice[i]]);
      after += bytes - L.f;
      return Object.assign(clone(T.row), {name: L.n, setting: o === opt0 ? W.texts[L.u || 0] : o.l,
                                          settings: clone(o.r), bytes_before: L.f, bytes_after: bytes});
    });
    plan.steps = steps;
    plan.prediction = Object.assign(clone(T.prediction), {
      bytes_before: W.before, bytes_after: after, ratio: after ? W.before / after : 0.0,
      meets_size_budget: W.budget_mb ? after / 1e6 <= W.budget_mb : null});
    plan.trace = [Object.assign(clone(T.trace), {layers: changed, detail: W.detail
      .replace('{changed}', changed.length).replace('{total}', wl.length).replace('{compressed}', compressed)})];
    return plan;
  }

  function download() {
    // JSON is YAML: `compressadvise apply --plan plan.yaml` reads this file as it is.
    var blob = new Blob([JSON.stringify(buildPlan(), null, 2) + '\n'], {type: 'application/x-yaml'});
    var a = document.createElement('a');
    a.href = URL.createObjectURL(blob);
    a.download = 'plan.yaml';
    document.body.appendChild(a);
    a.click();
    setTimeout(function () { URL.revokeObjectURL(a.href); a.remove(); }, 30000);
    $('wi-status').textContent = 'plan.yaml written: compressadvise apply MODEL --plan plan.yaml --out DIR';
  }

  // ---------------------------------------------------------------- start
  function init() {
    var holder = $('whatif-data');
    if (!holder) return;
    W = JSON.parse(holder.textContent);
    wl = W.layers.filter(function (L) { return L.s !== undefined; });
    choice = wl.map(function (L) { return L.c; });
    opt0 = W.opts[0];
    keyIndex = {};
    W.opts.forEach(function (o, i) { keyIndex[o.k] = i; });
    fillControls();
    $('whatif-table').tBodies[0].innerHTML = wl.map(function (_, i) { return rowHtml(i); }).join('');
    $('whatif-table').tBodies[0].addEventListener('change', function (e) {
      var tr = e.target.closest('tr'), i = +tr.getAttribute('data-i');
      choice[i] = W.sets[wl[i].s].indexOf(keyIndex[e.target.value]);
      refreshRow(i);
      showTotals();
    });
    ['wi-type', 'wi-name', 'wi-prefix', 'wi-only'].forEach(function (id) {
      $(id).addEventListener(id === 'wi-type' || id === 'wi-only' ? 'change' : 'input', showSelection);
    });
    $('wi-apply').addEventListener('click', setSelected);
    $('wi-reset').addEventListener('click', function () {
      choice = wl.map(function (L) { return L.c; });
      refreshAll();
      $('wi-status').textContent = 'back to the plan';
    });
    $('wi-download').addEventListener('click', download);
    showSelection();
    showTotals();
    window.compressadviseWhatIf = {plan: buildPlan, totals: totals, set: setSelected};
  }

  document.addEventListener('DOMContentLoaded', function () { setTimeout(init, 0); });
})();
