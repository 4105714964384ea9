"""Image files that declare their origin, built by the tests themselves: XMP packets written into JPEG, PNG and
WebP containers, and C2PA manifests signed with certificates generated here (no real signer's key is needed, and
no file is downloaded)."""

from __future__ import annotations

import datetime
import io
import json
import struct
import zlib
from dataclasses import dataclass

from PIL import Image

IPTC_TYPES = "http://cv.iptc.org/newscodes/digitalsourcetype/"
AI_TYPE = IPTC_TYPES + "trainedAlgorithmicMedia"
CAMERA_TYPE = IPTC_TYPES + "digitalCapture"


def jpeg(color=(200, 30, 30), size=(64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def png(color=(30, 200, 30), size=(64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def xmp_packet(source_type: str | None = AI_TYPE, *, as_element: bool = False, body: str | None = None) -> bytes:
    """An XMP packet declaring `source_type`, as an attribute of rdf:Description or as an element."""
    if body is None:
        if source_type is None:
            body = '<rdf:Description rdf:about=""/>'
        elif as_element:
            body = (
                '<rdf:Description rdf:about="">'
                f'<Iptc4xmpExt:DigitalSourceType rdf:resource="{source_type}"/></rdf:Description>'
            )
        else:
            body = f'<rdf:Description rdf:about="" Iptc4xmpExt:DigitalSourceType="{source_type}"/>'
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#" '
        'xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/">'
        f"{body}</rdf:RDF></x:xmpmeta>"
        '<?xpacket end="w"?>'
    ).encode()


def jpeg_with_xmp(packet: bytes, base: bytes | None = None) -> bytes:
    """`base` with an APP1 XMP segment right after its SOI marker."""
    base = base or jpeg()
    segment = b"http://ns.adobe.com/xap/1.0/\x00" + packet
    return base[:2] + b"\xff\xe1" + struct.pack(">H", len(segment) + 2) + segment + base[2:]


def png_with_xmp(packet: bytes, base: bytes | None = None, *, compressed: bool = False) -> bytes:
    """`base` with an iTXt XMP chunk right after IHDR."""
    base = base or png()
    text = zlib.compress(packet) if compressed else packet
    body = b"XML:com.adobe.xmp\x00" + bytes([int(compressed), 0]) + b"\x00\x00" + text
    chunk = struct.pack(">I", len(body)) + b"iTXt" + body + struct.pack(">I", zlib.crc32(b"iTXt" + body))
    end_of_ihdr = 8 + 8 + 13 + 4
    return base[:end_of_ihdr] + chunk + base[end_of_ihdr:]


def truncated_manifest(data: bytes) -> bytes:
    """A signed JPEG whose first C2PA segment (APP11) lost the second half of its JUMBF boxes, its length fixed
    up so that the JPEG itself stays well-formed."""
    start = data.index(b"\xff\xeb")
    length = struct.unpack(">H", data[start + 2 : start + 4])[0]
    kept = (length - 2) // 2
    segment = data[start + 4 : start + 4 + kept]
    return data[:start] + b"\xff\xeb" + struct.pack(">H", kept + 2) + segment + data[start + 2 + length :]


def with_xmp(image_format: str, packet: bytes, color=(10, 120, 200)) -> bytes:
    """An image in `image_format` carrying `packet` where that format keeps XMP: Pillow writes it for JPEG and
    WebP, and for TIFF as tag 700; PNG takes an iTXt chunk (`png_with_xmp`)."""
    image, buffer = Image.new("RGB", (64, 48), color), io.BytesIO()
    if image_format == "PNG":
        return png_with_xmp(packet)
    if image_format == "TIFF":
        from PIL import TiffImagePlugin

        tags = TiffImagePlugin.ImageFileDirectory_v2()
        tags[700], tags.tagtype[700] = packet, 1  # XMP, as bytes
        image.save(buffer, "TIFF", tiffinfo=tags)
    else:
        image.save(buffer, image_format, xmp=packet)
    return buffer.getvalue()


@dataclass(frozen=True)
class Credentials:
    """A test CA and a signing certificate it issued, as PEM."""

    ca_pem: str
    chain_pem: str  # the signing certificate, then the CA
    key_pem: str


def credentials(name: str = "Test Generator") -> Credentials:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def subject(common_name: str) -> x509.Name:
        return x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ITEM tests"),
            ]
        )

    def usage(*, ca: bool) -> x509.KeyUsage:
        return x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, key_cert_sign=ca, crl_sign=ca, encipher_only=False, decipher_only=False,
        )  # fmt: skip

    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())

    def certificate(subject_name, public_key, *, ca: bool):
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject_name)
            .issuer_name(subject(f"{name} CA"))
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(usage(ca=ca), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        )
        if not ca:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False
            ).add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        return builder.sign(ca_key, hashes.SHA256())

    ca = certificate(subject(f"{name} CA"), ca_key.public_key(), ca=True)
    leaf = certificate(subject(name), key.public_key(), ca=False)
    pem = serialization.Encoding.PEM
    return Credentials(
        ca_pem=ca.public_bytes(pem).decode(),
        chain_pem=leaf.public_bytes(pem).decode() + ca.public_bytes(pem).decode(),
        key_pem=key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode(),
    )


def signed(base: bytes, creds: Credentials, mime: str = "image/jpeg", source_type: str | None = AI_TYPE) -> bytes:
    """`base` with an embedded C2PA manifest, signed by `creds`, whose creation action declares `source_type`."""
    import c2pa

    action = {"action": "c2pa.created"}
    if source_type:
        action["digitalSourceType"] = source_type
    manifest = {
        "claim_generator_info": [{"name": "ITEM test generator", "version": "1.0"}],
        "title": "generated.jpg",
        "assertions": [{"label": "c2pa.actions", "data": {"actions": [action]}}],
    }
    info = c2pa.C2paSignerInfo("es256", creds.chain_pem.encode(), creds.key_pem.encode(), None)
    output = io.BytesIO()
    with c2pa.Signer.from_info(info) as signer, c2pa.Builder(json.dumps(manifest)) as builder:
        builder.sign(signer, mime, io.BytesIO(base), output)
    return output.getvalue()
