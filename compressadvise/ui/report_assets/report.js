/* compressadvise report: draws the charts (Vega, inlined) and makes the layer table sortable,
   filterable and searchable; one selected layer is shared by the table and every layer chart.
   No network: every input is in this page. */
(function () {
  'use strict';
  var table, rows, count, query, typeSel, changedOnly;
  var selected = null;  // the selected layer's name, shared by the table and the charts
  var views = {};       // chart id -> its Vega view, once drawn
  var SIGNAL = 'sel';   // the Vega signal each layer chart highlights (report_charts.py: SELECTION)

  function cellValue(row, index, numeric) {
    var cell = row.cells[index];
    if (!numeric) return cell.textContent.toLowerCase();
    var v = cell.getAttribute('data-v');
    return v === '' || v === null ? null : parseFloat(v);
  }

  function layerName(row) { return row.cells[1].textContent; }
  function layerType(row) { return row.cells[2].textContent; }

  function sortBy(th) {
    var index = Array.prototype.indexOf.call(th.parentNode.children, th);
    var numeric = th.getAttribute('data-type') === 'num';
    var asc = th.getAttribute('aria-sort') === 'descending' ||
              (th.getAttribute('aria-sort') === 'none' && !numeric);
    Array.prototype.forEach.call(th.parentNode.children, function (h) { h.setAttribute('aria-sort', 'none'); });
    th.setAttribute('aria-sort', asc ? 'ascending' : 'descending');
    var keyed = rows.map(function (r, i) { return [cellValue(r, index, numeric), i, r]; });
    keyed.sort(function (a, b) {
      if (a[0] === null && b[0] === null) return a[1] - b[1];
      if (a[0] === null) return 1;   // missing values last, whatever the direction
      if (b[0] === null) return -1;
      var c = a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : a[1] - b[1];
      return asc ? c : -c;
    });
    var body = table.tBodies[0];
    var frag = document.createDocumentFragment();
    keyed.forEach(function (k) { frag.appendChild(k[2]); });
    body.appendChild(frag);
    rows = keyed.map(function (k) { return k[2]; });
  }

  function applyFilters() {
    var q = query.value.trim().toLowerCase();
    var t = typeSel.value;
    var onlyChanged = changedOnly.checked;
    var shown = 0;
    rows.forEach(function (r) {
      var text = (layerName(r) + ' ' + r.querySelector('td.setting').textContent).toLowerCase();
      var ok = (!q || text.indexOf(q) >= 0) && (!t || layerType(r) === t) &&
               (!onlyChanged || r.getAttribute('data-changed') === '1');
      r.classList.toggle('hidden', !ok);
      if (ok) shown++;
    });
    count.textContent = shown + ' of ' + rows.length + ' layers';
  }

  function highlight(view) {
    try { view.signal(SIGNAL, selected || '').runAsync(); } catch (e) { /* a chart without layers */ }
  }

  function rowOf(name) {
    for (var i = 0; i < rows.length; i++) if (layerName(rows[i]) === name) return rows[i];
    return null;
  }

  function scrollToRow(row) {
    // Inside the table's own scroll box only: the charts the user clicked stay in view.
    var wrap = row.closest('.tablewrap');
    if (!wrap) return;
    var top = row.getBoundingClientRect().top - wrap.getBoundingClientRect().top + wrap.scrollTop;
    wrap.scrollTop = Math.max(0, top - wrap.clientHeight / 3);
  }

  function selectLayer(name, opts) {
    selected = name || null;
    var row = null;
    rows.forEach(function (r) {
      var on = layerName(r) === selected;
      r.classList.toggle('selected', on);
      r.setAttribute('aria-selected', on ? 'true' : 'false');
      if (on) row = r;
    });
    Object.keys(views).forEach(function (id) { highlight(views[id]); });
    var bar = document.getElementById('selection');
    if (bar) {
      bar.hidden = !selected;
      document.getElementById('selected-name').textContent = selected || '';
    }
    if (row && !(opts && opts.scroll === false)) scrollToRow(row);
    return row !== null;
  }

  function showSelected() {
    var row = selected && rowOf(selected);
    if (!row) return;
    if (row.classList.contains('hidden')) {  // filtered out: clear the filters so it shows
      query.value = ''; typeSel.value = ''; changedOnly.checked = false; applyFilters();
    }
    document.getElementById('layers-section').scrollIntoView();
    scrollToRow(row);
  }

  function onRowClick(e) {
    var row = e.target.closest('tr');
    if (!row || row.parentNode !== table.tBodies[0]) return;
    var name = layerName(row);
    selectLayer(name === selected ? null : name, {scroll: false});
  }

  function initTable() {
    table = document.getElementById('layers');
    if (!table) return;
    rows = Array.prototype.slice.call(table.tBodies[0].rows);
    count = document.getElementById('count');
    query = document.getElementById('q');
    typeSel = document.getElementById('type-filter');
    changedOnly = document.getElementById('changed-only');
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th) {
      th.addEventListener('click', function () { sortBy(th); });
      th.addEventListener('keydown', function (e) { if (e.key === 'Enter' || e.key === ' ') { e.preventDefault(); sortBy(th); } });
    });
    query.addEventListener('input', applyFilters);
    typeSel.addEventListener('change', applyFilters);
    changedOnly.addEventListener('change', applyFilters);
    table.tBodies[0].addEventListener('click', onRowClick);  // one listener, not one per row
    var show = document.getElementById('show-selected');
    if (show) show.addEventListener('click', showSelected);
    var clear = document.getElementById('clear-selection');
    if (clear) clear.addEventListener('click', function () { selectLayer(null); });
    window.compressadviseReport = {
      sortBy: sortBy, applyFilters: applyFilters, selectLayer: selectLayer, showSelected: showSelected,
      selected: function () { return selected; },
      view: function (id) { return views[id] || null; }
    };
  }

  function openRule(e) {
    // A rule link opens its explanation (a closed <details> would hide the text it points to).
    var a = e.target.closest('a.ruleref');
    if (!a) return;
    var target = document.getElementById(a.getAttribute('href').slice(1));
    if (target && target.tagName === 'DETAILS') target.open = true;
  }

  function printing(on) {
    // Print every explanation and folded table; restore what the reader had open afterwards.
    Array.prototype.forEach.call(document.querySelectorAll('details'), function (d) {
      if (on && !d.open) { d.setAttribute('data-print-opened', ''); d.open = true; }
      if (!on && d.hasAttribute('data-print-opened')) { d.removeAttribute('data-print-opened'); d.open = false; }
    });
  }

  function loadRuntime() {
    // The Vega runtime ships inert (type=text/plain) so that it does not hold up the page.
    var src = document.getElementById('vega-runtime');
    if (!src || typeof vegaEmbed === 'function') return;
    var s = document.createElement('script');
    s.textContent = src.textContent;
    document.head.appendChild(s);
  }

  function renderCharts() {
    loadRuntime();
    var holder = document.getElementById('chart-specs');
    var specs = holder ? JSON.parse(holder.textContent) : {};
    var boxes = document.querySelectorAll('[data-chart]');
    Array.prototype.forEach.call(boxes, function (el) {
      var fail = function (e) { el.setAttribute('data-rendered', 'error'); el.textContent = 'chart failed: ' + e; };
      if (typeof vegaEmbed !== 'function') { fail('the inlined Vega runtime is missing'); return; }
      // Precompiled Vega specs; actions off: the export menu would link to online editors.
      vegaEmbed(el, specs[el.getAttribute('data-chart')], {mode: 'vega', renderer: 'svg', actions: false})
        .then(function (result) {
          result.view.addEventListener('click', function (event, item) {
            var d = item && item.datum;
            if (d && typeof d.layer === 'string' && d.layer.charAt(0) !== '(') selectLayer(d.layer);
          });
          views[el.getAttribute('data-chart')] = result.view;
          if (selected) highlight(result.view);  // selected before this chart was drawn
          el.setAttribute('data-rendered', '1');
        }, fail);
    });
  }

  document.addEventListener('DOMContentLoaded', function () {
    initTable();
    document.addEventListener('click', openRule);
    var linked = location.hash && document.getElementById(location.hash.slice(1));
    if (linked && linked.tagName === 'DETAILS') linked.open = true;  // report.html#rule-WGT001
    window.addEventListener('beforeprint', function () { printing(true); });
    window.addEventListener('afterprint', function () { printing(false); });
    if (window.matchMedia) {  // print preview and emulated print media
      var mq = window.matchMedia('print');
      if (mq.addEventListener) mq.addEventListener('change', function (e) { printing(e.matches); });
    }
    // Charts after the first paint: the table is usable at once, even on a 1,000-layer model.
    setTimeout(function () {
      renderCharts();
      // The table skipped layout while the page loaded (content-visibility: auto); lay it out
      // now so full-page screenshots and printouts include it.
      var wrap = document.querySelector('.tablewrap');
      if (wrap) setTimeout(function () { wrap.style.contentVisibility = 'visible'; }, 0);
    }, 0);
  });
})();
