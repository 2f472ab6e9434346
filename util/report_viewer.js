// The report's 3D viewer (Deep3DFaceRecon, util/report.py): one WebGL canvas, meshes loaded on
// demand as classic scripts (report/<face>.mesh.js calls D3DFR.mesh), so that the page works
// opened from disk (file://). Needs three.js (window.THREE, tools/vendor_viewer.sh); without it
// the page shows its note and this file only wires nothing.
(function () {
  "use strict";
  var D = (window.D3DFR = window.D3DFR || {});
  var meshes = {};
  var wanted = null;
  var view = null;

  function decode(b64, Type) {
    var bin = atob(b64);
    var bytes = new Uint8Array(bin.length);
    for (var i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    return new Type(bytes.buffer);
  }

  D.triangles = function (bits, b64) {
    D.index = decode(b64, bits === 16 ? Uint16Array : Uint32Array);
    show();
  };

  D.mesh = function (key, m) {
    meshes[key] = m;
    show();
  };

  function setup() {
    var canvas = document.getElementById("viewer");
    if (!canvas || typeof THREE === "undefined") return null;
    var renderer = new THREE.WebGLRenderer({ canvas: canvas, antialias: true, preserveDrawingBuffer: true });
    renderer.setPixelRatio(window.devicePixelRatio || 1);
    renderer.setSize(canvas.clientWidth, canvas.clientHeight, false);
    renderer.setClearColor(0x20242a, 1);
    var scene = new THREE.Scene();
    var camera = new THREE.PerspectiveCamera(30, canvas.clientWidth / canvas.clientHeight, 0.1, 100);
    camera.position.set(0, 0, 7);
    var pivot = new THREE.Group();
    scene.add(pivot);
    var v = { renderer: renderer, scene: scene, camera: camera, pivot: pivot, mesh: null };
    v.draw = function () { renderer.render(scene, camera); };
    var drag = null;
    canvas.addEventListener("pointerdown", function (e) {
      drag = { x: e.clientX, y: e.clientY };
      canvas.setPointerCapture(e.pointerId);
    });
    canvas.addEventListener("pointermove", function (e) {
      if (!drag) return;
      pivot.rotation.y += (e.clientX - drag.x) * 0.01;
      pivot.rotation.x += (e.clientY - drag.y) * 0.01;
      drag = { x: e.clientX, y: e.clientY };
      v.draw();
    });
    canvas.addEventListener("pointerup", function () { drag = null; });
    canvas.addEventListener("wheel", function (e) {
      e.preventDefault();
      camera.position.z = Math.min(30, Math.max(2, camera.position.z * (e.deltaY > 0 ? 1.1 : 0.9)));
      v.draw();
    }, { passive: false });
    return v;
  }

  function show() {
    if (!view || !wanted || !D.index || !meshes[wanted]) return;
    var m = meshes[wanted];
    var q = decode(m.p, Int16Array);
    var pos = new Float32Array(q.length);
    for (var i = 0; i < q.length; i++) pos[i] = q[i] * m.scale;  // centred on the mesh's box
    var geo = new THREE.BufferGeometry();
    geo.setAttribute("position", new THREE.BufferAttribute(pos, 3));
    geo.setAttribute("color", new THREE.BufferAttribute(decode(m.c, Uint8Array), 3, true));
    geo.setIndex(new THREE.BufferAttribute(D.index, 1));
    geo.computeBoundingSphere();
    var mesh = new THREE.Mesh(geo, new THREE.MeshBasicMaterial({ vertexColors: true, side: THREE.DoubleSide }));
    var r = geo.boundingSphere.radius || 1;
    mesh.scale.setScalar(1.6 / r);
    if (view.mesh) {
      view.pivot.remove(view.mesh);
      view.mesh.geometry.dispose();
      view.mesh.material.dispose();
    }
    view.mesh = mesh;
    view.pivot.add(mesh);
    view.draw();
    document.getElementById("viewer-label").textContent = wanted;
    document.body.setAttribute("data-viewer-shown", wanted);
  }

  function select(fig) {
    var key = fig.getAttribute("data-key");
    var old = document.querySelector(".face.selected");
    if (old) old.classList.remove("selected");
    fig.classList.add("selected");
    wanted = key;
    if (meshes[key]) { show(); return; }
    var s = document.createElement("script");
    s.src = fig.getAttribute("data-mesh");
    s.onerror = function () {
      document.getElementById("viewer-label").textContent = key + ": no mesh file (" + s.src + ")";
    };
    document.head.appendChild(s);
  }

  function init() {
    view = setup();
    var figs = document.querySelectorAll(".face");
    var buttons = document.querySelectorAll(".view3d");
    if (!view) {
      for (var i = 0; i < buttons.length; i++) buttons[i].disabled = true;
      var c = document.getElementById("viewer");
      if (c) c.style.display = "none";
      return;
    }
    for (var j = 0; j < figs.length; j++) {
      (function (fig) {
        var b = fig.querySelector(".view3d");
        if (b) b.addEventListener("click", function () { select(fig); });
      })(figs[j]);
    }
    if (figs.length) select(figs[0]);
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
