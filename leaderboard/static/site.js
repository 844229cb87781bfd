/* exitbench leaderboard: the batch-size switch and sortable tables. No dependencies, no
   network; every page works without it (the smallest batch size is shown). */
(function () {
  "use strict";

  function siteData() {
    var element = document.getElementById("site-data");
    if (!element) { return {}; }
    try { return JSON.parse(element.textContent); } catch (error) { return {}; }
  }

  function showBatch(value) {
    var views = document.querySelectorAll("[data-batch-size]");
    for (var i = 0; i < views.length; i++) {
      views[i].hidden = views[i].getAttribute("data-batch-size") !== value;
    }
    var selects = document.querySelectorAll("select.batch-select");
    for (var j = 0; j < selects.length; j++) { selects[j].value = value; }
    document.documentElement.setAttribute("data-batch-size-shown", value);
  }

  function cellValue(row, index, type) {
    var cell = row.cells[index];
    if (!cell) { return null; }
    var raw = cell.hasAttribute("data-sort") ? cell.getAttribute("data-sort") : cell.textContent.trim();
    if (type === "number") {
      var number = parseFloat(raw);
      return isNaN(number) ? null : number;
    }
    return raw.toLowerCase();
  }

  function sortTable(table, index) {
    var headers = table.tHead.rows[0].cells;
    var header = headers[index];
    var type = header.getAttribute("data-type") || "text";
    var current = header.getAttribute("aria-sort");
    // first click: numbers best (largest) first, text A to Z; later clicks flip
    var descending = current ? current === "ascending" : type === "number";
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = cellValue(a, index, type);
      var y = cellValue(b, index, type);
      if (x === null || y === null) { return (x === null) - (y === null); } // n/a last
      var order = x < y ? -1 : (x > y ? 1 : 0);
      return descending ? -order : order;
    });
    for (var i = 0; i < rows.length; i++) { body.appendChild(rows[i]); }
    for (var j = 0; j < headers.length; j++) { headers[j].removeAttribute("aria-sort"); }
    header.setAttribute("aria-sort", descending ? "descending" : "ascending");
  }

  function initTables() {
    var tables = document.querySelectorAll("table.sortable");
    for (var t = 0; t < tables.length; t++) {
      (function (table) {
        if (!table.tHead || !table.tBodies.length) { return; }
        var headers = table.tHead.rows[0].cells;
        for (var i = 0; i < headers.length; i++) {
          (function (index) {
            var button = headers[index].querySelector("button");
            if (button) { button.addEventListener("click", function () { sortTable(table, index); }); }
          })(i);
        }
      })(tables[t]);
    }
  }

  function init() {
    var data = siteData();
    var selects = document.querySelectorAll("select.batch-select");
    for (var i = 0; i < selects.length; i++) {
      selects[i].addEventListener("change", function (event) { showBatch(event.target.value); });
    }
    if (data.default_batch_size !== undefined) { showBatch(String(data.default_batch_size)); }
    initTables();
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", init);
  } else {
    init();
  }
})();
